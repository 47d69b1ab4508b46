"""`make demo-real`: a LoRA adapter for the real SmolLM2-135M-Instruct, on a CPU.

The same three steps as `make demo` (sekft.demo), on the real model `make real-base`
converts, with the recipes in recipes/ (copy them to start your own):

1. data: expert trajectories of the suite's training families and of generated families
   (sekft.scenarios.factory, train family seeds), with detours (a read-only step repeated;
   for generated families whose tool nobody names, a wrong guess at its name) shown
   untrained, and held-out scenario folders: unseen
   instances of the training families, every instance of the families no run ever trains
   on (`ticket`, `publish`) and instances of held-out generated families;
2. training: `sekft-train --config recipes/smollm2-135m-train.toml`;
3. evaluation: `sekft-eval --config recipes/smollm2-135m-eval.toml --baseline`, the base
   alone and base + adapter, then the table per group with Wilson intervals;
4. the curve: the checkpoints training saved along the way (--checkpoints), each evaluated
   with the adapter alone on the same held-out scenarios, against the training time and
   tokens it had had.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

from sekft.demo import command, group_rates, percent, run_step, side_by_side
from sekft.errors import ConfigError, run_cli
from sekft.eval import wilson
from sekft.recipe import read_recipe
from sekft.rundir import write_json_atomic
from sekft.scenarios import HELDOUT_FAMILIES, TRAIN_FAMILIES

GROUPS = {"trained families": TRAIN_FAMILIES, "never-trained families": HELDOUT_FAMILIES}
GENERATED = "held-out generated families"
ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sekft.demo_real",
                                description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=Path("build/demo-real"), help="output folder")
    p.add_argument("--base", type=Path, default=Path("build/smollm2-135m-instruct"))
    p.add_argument("--train-recipe", type=Path,
                   default=ROOT / "recipes" / "smollm2-135m-train.toml")
    p.add_argument("--eval-recipe", type=Path,
                   default=ROOT / "recipes" / "smollm2-135m-eval.toml")
    p.add_argument("--seeds", type=int, default=20,
                   help="recorded training episodes per training family")
    p.add_argument("--eval-seeds", type=int, default=5,
                   help="held-out episodes per family")
    p.add_argument("--factory-families", type=int, default=100,
                   help="generated training families recorded beside the suite (0: none)")
    p.add_argument("--factory-seeds", type=int, default=3,
                   help="recorded episodes per generated training family")
    p.add_argument("--detours", type=float, default=0.5,
                   help="share of training instances also recorded with a read-only step "
                        "repeated, the repeat untrained (what breaks greedy loops)")
    p.add_argument("--guesses", type=float, default=1.0,
                   help="share of generated instances whose expert looks for an unnamed tool "
                        "also recorded with a wrong guess at its name first, the guess "
                        "untrained (what a model that guessed wrong needs to see)")
    p.add_argument("--factory-heldout", type=int, default=10,
                   help="held-out generated families evaluated, one instance each (0: none)")
    p.add_argument("--steps", type=int, default=None, help="override the recipe's max-steps")
    p.add_argument("--checkpoints", type=int, default=2,
                   help="checkpoints along training to evaluate for the curve (0: none)")
    p.add_argument("--threads", type=int, default=2, help="torch threads per process")
    return p.parse_args(argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    if min(args.seeds, args.eval_seeds, args.threads, args.factory_seeds) < 1:
        raise ConfigError("--seeds, --eval-seeds, --factory-seeds and --threads must be at "
                          "least 1")
    if min(args.checkpoints, args.factory_families, args.factory_heldout) < 0:
        raise ConfigError("--checkpoints, --factory-families and --factory-heldout must be "
                          "0 or more")
    if not (args.base / "config.json").exists():
        raise ConfigError(f"{args.base}: no converted model there; run `make real-base`")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-m"]
    data, scenarios = work / "data", work / "heldout-scenarios"
    generated = work / "generated"
    for folder in (data, scenarios, generated):
        shutil.rmtree(folder, ignore_errors=True)
    started = time.perf_counter()
    times = {}
    times["data"] = run_step("1/3 data: training families' trajectories", py + [
        "sekft.scenarios.record", "--split", "train", "--seeds", str(args.seeds),
        "--out", str(data / "suite.jsonl"), "--jobs", "2", "--detours", str(args.detours),
    ], env)
    if args.factory_families:
        times["data"] += run_step("1/3 data: generated families' trajectories", py + [
            "sekft.scenarios.factory", "--split", "train", "--families",
            str(args.factory_families), "--seeds", str(args.factory_seeds),
            "--out", str(generated / "train"),
        ], env) + run_step("1/3 data: record them", py + [
            "sekft.scenarios.record", "--split", "train", "--scenarios",
            str(generated / "train"), "--out", str(data / "generated.jsonl"), "--jobs", "2",
            "--detours", str(args.detours), "--guesses", str(args.guesses),
        ], env)
    times["data"] += run_step("1/3 data: held-out scenarios", py + [
        "sekft.scenarios", "--split", "heldout", "--seeds", str(args.eval_seeds),
        "--out", str(scenarios),
    ], env)
    if args.factory_heldout:
        # into the same folder, so that one sekft-eval run (one table) covers every group
        times["data"] += run_step("1/3 data: held-out generated families", py + [
            "sekft.scenarios.factory", "--split", "heldout", "--families",
            str(args.factory_heldout), "--seeds", "1", "--out", str(scenarios),
        ], env)
    groups = demo_groups(scenarios)
    steps = ["--max-steps", str(args.steps)] if args.steps else []
    total_steps = args.steps or read_recipe(args.train_recipe).get("max-steps")
    every = save_every(total_steps, args.checkpoints)
    steps += ["--save-every", str(every)] if every else []
    times["train"] = run_step("2/3 train a LoRA adapter on SmolLM2-135M-Instruct",
                              command("sekft-train", "sekft.sft") + [
        "--config", str(args.train_recipe), "--base", str(args.base), "--data", str(data),
        "--out", str(work / "adapter"), "--overwrite", *steps,
    ], env)
    times["eval"] = run_step("3/3 evaluate the base alone and base + adapter",
                             command("sekft-eval", "sekft.eval") + [
        "--config", str(args.eval_recipe), "--base", str(args.base),
        "--adapter", str(work / "adapter"), "--baseline", "--scenarios", str(scenarios),
        "--out", str(work / "eval"),
    ], env)
    results = json.loads((work / "eval" / "results.json").read_text())
    points = []
    metrics = work / "adapter" / "metrics.jsonl"
    # the step training really ended at (a short dataset can end it before max-steps)
    final = json.loads(metrics.read_text().splitlines()[-1])["step"]
    for step, folder in curve_checkpoints(work / "adapter", final) if every else []:
        times["eval"] += run_step(f"3/3 evaluate the checkpoint at step {step} (the curve)",
                                  command("sekft-eval", "sekft.eval") + [
            "--config", str(args.eval_recipe), "--base", str(args.base), "--adapter",
            str(folder), "--scenarios", str(scenarios), "--out", str(work / f"eval-{step}"),
        ], env)
        episodes = json.loads((work / f"eval-{step}" / "results.json").read_text())["episodes"]
        points.append(curve_point(step, metrics, episodes, groups))
    if every:
        points.append(curve_point(final, metrics, results["episodes"], groups))
        write_json_atomic(work / "curve.json", points)
    total = time.perf_counter() - started
    print(f"\n== sekft demo-real: held-out episodes, base alone vs base + adapter ({total:.0f} s "
          f"in all: data {times['data']:.0f} s, training {times['train']:.0f} s, "
          f"evaluation {times['eval']:.0f} s)")
    print(side_by_side(results["episodes"], groups))
    if len(points) > 1:
        print("\n== pass rate against training (base + adapter; checkpoints of one run)")
        print(curve_table(points, groups))
    print(f"\ntranscripts: {work / 'eval' / 'report.html'}")
    return 0


def save_every(total_steps: int | None, points: int) -> int:
    """The --save-every that leaves `points` checkpoints evenly along `total_steps` (the
    last is the final adapter); 0 when no curve is asked for or the steps are unknown."""
    if not points or not total_steps:
        return 0
    return max(1, math.ceil(total_steps / points))


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    """The (step, folder) of each checkpoint-N folder sekft-train saved in `run`, by step."""
    found = [(int(p.name.split("-", 1)[1]), p) for p in run.glob("checkpoint-*")
             if p.name.split("-", 1)[1].isdigit() and (p / "adapter_config.json").exists()]
    return sorted(found)


def curve_checkpoints(run: Path, final: int) -> list[tuple[int, Path]]:
    """The checkpoints of `run` the curve evaluates besides the final adapter: those before
    step `final` (sekft-train also saves a run's last step as a checkpoint, and the main
    evaluation has covered it already)."""
    return [(step, folder) for step, folder in checkpoints(run) if step < final]


def demo_groups(scenarios: Path) -> dict[str, tuple[str, ...]]:
    """The table's groups for the held-out folder `scenarios`: the suite's two, and the
    generated families found there (any family the hand-written suite does not have)."""
    suite = set(TRAIN_FAMILIES) | set(HELDOUT_FAMILIES)
    found = {json.loads(p.read_text())["family"] for p in scenarios.glob("*/scenario.json")}
    generated = tuple(sorted(found - suite))
    return {**GROUPS, GENERATED: generated} if generated else dict(GROUPS)


def curve_point(step: int, metrics: Path, episodes: list[dict],
                groups: dict[str, tuple[str, ...]] = GROUPS) -> dict:
    """One point of the curve: the training time and tokens up to `step` (from the run's
    metrics.jsonl) and, per group, the adapter's (passed, episodes) and terminations."""
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    upto = [r for r in records if r["step"] <= step]
    seconds = upto[-1]["elapsed"] if upto and upto[-1]["step"] == step else None
    tokens = sum(r["tokens"] for r in upto)
    rates = group_rates([e for e in episodes if e["run"] == "adapter"], groups)
    groups = {group: {"pass": list(r["pass"]), "terminated": list(r["terminated"])}
              for (group, _), r in rates.items()}
    return {"step": step, "train_seconds": seconds, "tokens": tokens,
            "groups": groups}


def curve_table(points: list[dict], groups: dict[str, tuple[str, ...]] = GROUPS) -> str:
    """Pass rate per group (counts, 95% Wilson interval) at each checkpoint's step, with the
    training seconds and tokens it took to get there."""
    rows = [["step", "train time", "tokens"] + [f"pass: {g}" for g in groups]]
    for p in points:
        seconds = p["train_seconds"]
        cells = [str(p["step"]), "-" if seconds is None else f"{seconds:.0f} s",
                 f"{p['tokens']:,}"]
        for group in groups:
            k, n = p["groups"].get(group, {}).get("pass", (0, 0))
            low, high = wilson(k, n)
            cells.append(f"{percent(k, n)} [{low:.0%}-{high:.0%}]" if n else "-")
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def main(argv: list[str] | None = None) -> int:
    return run_cli("sekft.demo_real", _main, argv)


if __name__ == "__main__":
    sys.exit(main())

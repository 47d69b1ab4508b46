"""`make demo`: a LoRA adapter learns to operate the shell, on a CPU, from a fresh clone.

Three steps, each the command a user would type (printed before it runs):

1. data: expert trajectories of the adapter's families (`default_base.ADAPTER_FAMILIES`,
   which the shipped base never saw) plus a share of the base's own families against
   forgetting (`python -m sekft.scenarios.record`), and the held-out scenario folders
   (`python -m sekft.scenarios`): unseen instances of the base's and the adapter's
   families, and the suite's held-out families that neither ever trained on;
2. training: `sekft-train` of a LoRA adapter on the shipped default base;
3. evaluation: `sekft-eval --baseline` of base + adapter and of the base alone on the
   held-out scenarios, then one table with both rows per group (base families, adapter
   families, held-out families): checker pass, exit/panic termination, command mode.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from sekft.default_base import ADAPTER_FAMILIES, BASE_FAMILIES, DEFAULT_BASE
from sekft.errors import ConfigError, SekftError, run_cli
from sekft.eval import wilson
from sekft.scenarios import HELDOUT_FAMILIES

GROUPS = {
    "base families": BASE_FAMILIES,
    "adapter families": ADAPTER_FAMILIES,
    "held-out families": HELDOUT_FAMILIES,
}
RUNS = ("base", "adapter")


def group_of(family: str, groups: dict[str, tuple[str, ...]] = GROUPS) -> str:
    """The demo group a family belongs to."""
    for group, families in groups.items():
        if family in families:
            return group
    raise ConfigError(f"family {family!r} is in no demo group")


def percent(k: int, n: int) -> str:
    return f"{k / n:4.0%} ({k}/{n})" if n else "-"


def group_rates(
    episodes: list[dict], groups: dict[str, tuple[str, ...]] = GROUPS
) -> dict[tuple[str, str], dict[str, tuple[int, int]]]:
    """(group, run) -> {"pass", "terminated", "command mode"}: (count, out of), from the
    `episodes` of a sekft-eval results.json (scenario errors left out). Command mode counts
    replies: the share of the model's lines that are runnable commands."""
    rates: dict = {}
    for e in episodes:
        if e.get("error"):
            continue
        counts = rates.setdefault((group_of(e["family"], groups), e["run"]),
                                  {"pass": [0, 0], "terminated": [0, 0], "command mode": [0, 0]})
        counts["pass"][0] += bool(e["passed"])
        counts["terminated"][0] += e["ending"] in ("exit", "panic")
        counts["pass"][1] += 1
        counts["terminated"][1] += 1
        counts["command mode"][0] += sum(e["command_mode"])
        counts["command mode"][1] += len(e["command_mode"])
    return {key: {name: tuple(c) for name, c in counts.items()} for key, counts in rates.items()}


def side_by_side(episodes: list[dict], groups: dict[str, tuple[str, ...]] = GROUPS) -> str:
    """The demo's table: per group, the base's row and the adapter's, every rate with counts
    (pass with its 95% Wilson interval)."""
    rates = group_rates(episodes, groups)
    header = ["group", "run", "pass", "95% CI", "exit/panic", "command mode"]
    rows = [header]
    for group in groups:
        for run in RUNS:
            r = rates.get((group, run))
            if r is None:
                continue
            label = "base + adapter" if run == "adapter" else "base alone"
            low, high = wilson(*r["pass"])
            rows.append([group, label, percent(*r["pass"]), f"{low:.0%}-{high:.0%}",
                         percent(*r["terminated"]),
                         percent(*r["command mode"])])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in rows)


def command(script: str, module: str) -> list[str]:
    """How to run one of sekft's CLIs: its console script beside this Python when installed
    (`python -m sekft.eval` would run eval as __main__, whose exception classes differ from
    those the rest of sekft imports), else the module."""
    path = Path(sys.executable).parent / script
    return [str(path)] if path.exists() else [sys.executable, "-m", module]


def run_step(title: str, argv: list[str], env: dict[str, str]) -> float:
    """Run one step's command, its output streaming through; seconds taken. A failing
    step is a SekftError naming the command."""
    print(f"\n== {title}\n$ {' '.join(argv)}", flush=True)
    started = time.perf_counter()
    if subprocess.run(argv, env=env).returncode != 0:
        raise SekftError(f"demo step failed: {' '.join(argv)}; its output is above")
    return time.perf_counter() - started


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sekft.demo", description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=Path("build/demo"), help="output folder")
    p.add_argument("--base", type=Path, default=DEFAULT_BASE, help="the base to adapt")
    p.add_argument("--adapter-seeds", type=int, default=80,
                   help="recorded training episodes per adapter family")
    p.add_argument("--replay-seeds", type=int, default=8,
                   help="recorded training episodes per base family, against forgetting")
    p.add_argument("--eval-seeds", type=int, default=10,
                   help="held-out episodes per adapter family (half that for the others)")
    p.add_argument("--steps", type=int, default=1000, help="adapter training steps")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--jobs", type=int, default=2, help="episodes run at the same time")
    # One thread per process: two threads were 5x slower than one whenever anything else
    # ran on a 2-core machine, and the evaluator already runs --jobs episodes at once.
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="of training and eval (auto: bf16 where the CPU multiplies it natively)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the training and eval processes")
    return p.parse_args(argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    if min(args.adapter_seeds, args.replay_seeds, args.eval_seeds, args.steps, args.jobs,
           args.threads) < 1:
        raise ConfigError("--adapter-seeds, --replay-seeds, --eval-seeds, --steps, --jobs and "
                          "--threads must be at least 1")
    if not (args.base / "config.json").exists():
        raise ConfigError(f"{args.base}: no default base there; run `make base` to build it")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-m"]
    jobs = ["--jobs", str(args.jobs)]
    train_data, scenarios = work / "data", work / "heldout-scenarios"
    # The scenario writer refuses to mix runs in one folder; a demo run starts clean.
    shutil.rmtree(scenarios, ignore_errors=True)
    started = time.perf_counter()
    run_step("1/3 data: adapter families' trajectories", py + [
        "sekft.scenarios.record", "--split", "train", "--families", ",".join(ADAPTER_FAMILIES),
        "--seeds", str(args.adapter_seeds), "--out", str(train_data / "adapter.jsonl"), *jobs,
    ], env)
    run_step("1/3 data: base families' trajectories (against forgetting)", py + [
        "sekft.scenarios.record", "--split", "train", "--families", ",".join(BASE_FAMILIES),
        "--seeds", str(args.replay_seeds), "--first-seed", "100000",
        "--out", str(train_data / "replay.jsonl"), *jobs,
    ], env)
    for families, seeds in ((ADAPTER_FAMILIES, args.eval_seeds),
                            (BASE_FAMILIES + HELDOUT_FAMILIES, max(1, args.eval_seeds // 2))):
        run_step("1/3 data: held-out scenarios", py + [
            "sekft.scenarios", "--split", "heldout", "--families", ",".join(families),
            "--seeds", str(seeds), "--out", str(scenarios),
        ], env)
    train = command("sekft-train", "sekft.sft")
    run_step("2/3 train a LoRA adapter on the default base", train + [
        "--base", str(args.base), "--data", str(train_data),
        "--out", str(work / "adapter"), "--overwrite", "--r", str(args.r),
        "--alpha", str(2 * args.r), "--dropout", "0", "--lr", str(args.lr),
        "--max-steps", str(args.steps), "--batch-tokens", "1024", "--max-len", "1024",
        "--warmup-ratio", "0.05", "--log-every", "10", "--device", "cpu", "--dtype", args.dtype,
    ], env)
    evaluate = command("sekft-eval", "sekft.eval")
    run_step("3/3 evaluate base + adapter and the base alone on held-out scenarios", evaluate + [
        "--base", str(args.base), "--adapter", str(work / "adapter"),
        "--baseline", "--scenarios", str(scenarios), "--split", "heldout",
        "--out", str(work / "eval"), "--max-new-tokens", "48", "--device", "cpu",
        "--dtype", args.dtype, *jobs,
    ], env)
    results = json.loads((work / "eval" / "results.json").read_text())
    print(f"\n== sekft demo: held-out episodes, base alone vs base + adapter "
          f"({time.perf_counter() - started:.0f} s in all)")
    print(side_by_side(results["episodes"]))
    print(f"\ntranscripts: {work / 'eval' / 'report.html'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("sekft.demo", _main, argv)


if __name__ == "__main__":
    sys.exit(main())

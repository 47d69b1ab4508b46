"""`make demo-real`: a LoRA adapter for the real SmolLM2-135M-Instruct, on a CPU.

The same three steps as `make demo` (sekft.demo), on the real model `make real-base`
converts, with the recipes in recipes/ (copy them to start your own):

1. data: expert trajectories of the suite's training families, and held-out scenario
   folders: unseen instances of the training families and every instance of the families
   no run ever trains on (`ticket`, `publish`);
2. training: `sekft-train --config recipes/smollm2-135m-train.toml`;
3. evaluation: `sekft-eval --config recipes/smollm2-135m-eval.toml --baseline`, the base
   alone and base + adapter, then the table per group with Wilson intervals.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from sekft.demo import command, run_step, side_by_side
from sekft.errors import ConfigError, run_cli
from sekft.scenarios import HELDOUT_FAMILIES, TRAIN_FAMILIES

GROUPS = {"trained families": TRAIN_FAMILIES, "never-trained families": HELDOUT_FAMILIES}
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
    p.add_argument("--steps", type=int, default=None, help="override the recipe's max-steps")
    p.add_argument("--threads", type=int, default=2, help="torch threads per process")
    return p.parse_args(argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    if min(args.seeds, args.eval_seeds, args.threads) < 1:
        raise ConfigError("--seeds, --eval-seeds and --threads must be at least 1")
    if not (args.base / "config.json").exists():
        raise ConfigError(f"{args.base}: no converted model there; run `make real-base`")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-m"]
    data, scenarios = work / "data" / "train.jsonl", work / "heldout-scenarios"
    shutil.rmtree(scenarios, ignore_errors=True)
    started = time.perf_counter()
    times = {}
    times["data"] = run_step("1/3 data: training families' trajectories", py + [
        "sekft.scenarios.record", "--split", "train", "--seeds", str(args.seeds),
        "--out", str(data), "--jobs", "2",
    ], env)
    times["data"] += run_step("1/3 data: held-out scenarios", py + [
        "sekft.scenarios", "--split", "heldout", "--seeds", str(args.eval_seeds),
        "--out", str(scenarios),
    ], env)
    steps = ["--max-steps", str(args.steps)] if args.steps else []
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
    total = time.perf_counter() - started
    print(f"\n== sekft demo-real: held-out episodes, base alone vs base + adapter ({total:.0f} s "
          f"in all: data {times['data']:.0f} s, training {times['train']:.0f} s, "
          f"evaluation {times['eval']:.0f} s)")
    print(side_by_side(results["episodes"], GROUPS))
    print(f"\ntranscripts: {work / 'eval' / 'report.html'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("sekft.demo_real", _main, argv)


if __name__ == "__main__":
    sys.exit(main())

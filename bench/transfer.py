"""The transfer curve: pass rate on never-trained families against the number of training
factory families, at a fixed token budget.

    .venv/bin/python bench/transfer.py --base PATH/TO/SmolLM2-135M-Instruct \\
        [--families 10,30,100] [--sessions 300] [--steps 600] [--batch-tokens 4096] \\
        [--train-args "--r 16 --lr 1e-3"] [--work build/transfer] [--dry-run]

For each N in --families, with the same number of training sessions (--sessions: N families
x ceil(sessions / N) instances each) and the same optimizer budget (--steps x --batch-tokens
tokens), so that only the variety changes:

1. `python -m sekft.scenarios.factory --split train --families N` writes the training
   scenarios and `python -m sekft.scenarios.record --scenarios` records their experts;
2. `sekft-train` trains a LoRA adapter on them;
3. `sekft-eval` runs it on two held-out sets written once for all N: held-out factory
   families (no grammar, docs or work spec any training family has) and the 12 hand-written
   families of the built-in suite, which factory training never sees.

Prints one row per N: each set's pass rate with counts and its 95% Wilson interval.
Training the real model takes a while on a CPU: run it where a model and time are at hand.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from pathlib import Path

from sekft.demo import command, run_step
from sekft.eval import wilson

SETS = {"held-out factory families": "factory", "hand-written families": "handwritten"}
WIDTH = 36


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/transfer.py", description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True, help="the base model folder (the real SmolLM2)")
    p.add_argument("--work", type=Path, default=Path("build/transfer"))
    p.add_argument("--families", default="10,30,100", help="training family counts")
    p.add_argument("--sessions", type=int, default=300, help="training sessions for every N")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--heldout-families", type=int, default=20)
    p.add_argument("--heldout-seeds", type=int, default=2, help="instances per held-out family")
    p.add_argument("--handwritten-seeds", type=int, default=2,
                   help="held-out instances per hand-written family")
    p.add_argument("--vocab", choices=("open", "closed"), default="open")
    p.add_argument("--train-args", default="", help="more sekft-train options, one string")
    p.add_argument("--eval-args", default="", help="more sekft-eval options, one string")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    return p.parse_args(argv)


def plan(args: argparse.Namespace) -> list[tuple[str, list[str], Path | None]]:
    """Every step as (title, argv, output), in order; a step with an output already there
    (scenarios written, experts recorded by an earlier run) is skipped."""
    py = [sys.executable, "-m"]
    w = args.work
    steps = [
        ("held-out factory scenarios", py + [
            "sekft.scenarios.factory", "--split", "heldout", "--families",
            str(args.heldout_families), "--seeds", str(args.heldout_seeds), "--vocab",
            args.vocab, "--out", str(w / "heldout" / "factory")], w / "heldout" / "factory"),
        ("hand-written held-out scenarios", py + [
            "sekft.scenarios", "--split", "heldout", "--seeds", str(args.handwritten_seeds),
            "--out", str(w / "heldout" / "handwritten")], w / "heldout" / "handwritten"),
    ]
    for n in [int(x) for x in args.families.split(",")]:
        run = w / f"n{n}"
        seeds = math.ceil(args.sessions / n)
        steps += [
            (f"N={n}: training scenarios", py + [
                "sekft.scenarios.factory", "--split", "train", "--families", str(n), "--seeds",
                str(seeds), "--vocab", args.vocab, "--out", str(run / "scenarios")],
             run / "scenarios"),
            (f"N={n}: record experts", py + [
                "sekft.scenarios.record", "--split", "train", "--scenarios",
                str(run / "scenarios"), "--out", str(run / "train.jsonl"),
                "--jobs", str(args.jobs)], run / "train.jsonl"),
            (f"N={n}: train", command("sekft-train", "sekft.sft") + [
                "--base", args.base, "--data", str(run / "train.jsonl"), "--out",
                str(run / "adapter"), "--overwrite", "--max-steps", str(args.steps),
                "--batch-tokens", str(args.batch_tokens), *shlex.split(args.train_args)], None),
        ]
        for name in SETS.values():
            steps.append((f"N={n}: evaluate on {name}", command("sekft-eval", "sekft.eval") + [
                "--base", args.base, "--adapter", str(run / "adapter"), "--scenarios",
                str(w / "heldout" / name), "--split", "heldout", "--out",
                str(run / f"eval-{name}"), "--jobs", str(args.jobs),
                *shlex.split(args.eval_args)], None))
    return steps


def passes(results: Path) -> tuple[int, int]:
    """(passed, episodes) in a sekft-eval results.json, scenario errors left out."""
    episodes = [e for e in json.loads(results.read_text())["episodes"] if not e.get("error")]
    return sum(bool(e["passed"]) for e in episodes), len(episodes)


def row(n: int, work: Path) -> str:
    cells = []
    for name in SETS.values():
        k, total = passes(work / f"n{n}" / f"eval-{name}" / "results.json")
        low, high = wilson(k, total)
        cells.append(f"{k / total:5.1%} ({k}/{total}) [{low:.1%}, {high:.1%}]".ljust(WIDTH))
    return (f"{n:>4}  " + "  ".join(cells)).rstrip()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    steps = plan(args)
    if args.dry_run:
        print("\n".join(shlex.join(argv) for _, argv, _ in steps))
        return 0
    env = dict(os.environ)
    for title, argv_, output in steps:
        if output is None or not output.exists():
            run_step(title, argv_, env)
    print(f"\ntransfer at {args.sessions} sessions, {args.steps} steps x {args.batch_tokens} "
          "tokens; pass rate (k/n) [95% Wilson]")
    print(("   N  " + "  ".join(name.ljust(WIDTH) for name in SETS)).rstrip())
    for n in [int(x) for x in args.families.split(",")]:
        print(row(n, args.work))
    return 0


if __name__ == "__main__":
    sys.exit(main())

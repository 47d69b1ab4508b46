"""The transfer curve: pass rate on never-trained families against the number of training
factory families, at a fixed token budget.

    .venv/bin/python bench/transfer.py --base build/smollm2-135m-instruct \\
        [--families 10,30,100] [--sessions 300] [--baseline] [--work build/transfer] \\
        [--train-config recipes/smollm2-135m-train.toml] [--steps S] [--batch-tokens T] \\
        [--eval-config recipes/smollm2-135m-eval.toml] [--record-args "--detours 0.5"] \\
        [--vocab open|closed|mixed] [--dry-run]

For each N in --families, with the same number of training sessions (--sessions: N families
x ceil(sessions / N) instances each) and the same optimizer budget (the train recipe's
steps x batch tokens, or --steps / --batch-tokens), so that only the variety changes:

1. `python -m sekft.scenarios.factory --split train --families N` writes the training
   scenarios and `python -m sekft.scenarios.record --scenarios` records their experts
   (with --record-args: by default the detours and wrong guesses `make demo-real` records,
   and wrong ways of asking for help); --vocab mixed (the default) writes half the training
   instances with invented names, half with plain words;
2. `sekft-train --config TRAIN_RECIPE` trains a LoRA adapter on them;
3. `sekft-eval --config EVAL_RECIPE` runs it on two held-out sets written once for all N:
   held-out factory families (no grammar, docs or work spec any training family has) and
   the 12 hand-written families of the built-in suite, which factory training never sees.
   --baseline also runs the base alone on both (the N = 0 row).
4. With --seen K, it also runs the adapter on K new instances (instance seeds no training
   session used) of its own training families, at most 20 of them: a low rate there says
   the adapter did not learn what it was shown, rather than that it did not transfer.

Prints one row per N: each set's pass rate with counts and its 95% Wilson interval, the
adapter's validation loss and its training time; writes the same as WORK/transfer.json.
A step whose output is already there (scenarios, recordings, an adapter, an eval) is
skipped, so an interrupted run picks up where it stopped. Training the real model takes a
while on a CPU: about 15 min per N on 2 cores with the SmolLM2 recipes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import sys
from pathlib import Path

from train import cpu_description  # bench/train.py, beside this script

from sekft.demo import command, run_step
from sekft.eval import wilson
from sekft.recipe import read_recipe
from sekft.rundir import write_atomic
from sekft.scenarios.factory import family_spec

SETS = {"held-out factory families": "factory", "hand-written families": "handwritten"}
SEEN = "seen"  # new instances of the adapter's own training families
SEEN_FAMILIES = 20
SEEN_FIRST_SEED = 1000  # far above the instance seeds of any training session
WIDTH = 36


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/transfer.py", description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True, help="the base model folder (the real SmolLM2)")
    p.add_argument("--work", type=Path, default=Path("build/transfer"))
    p.add_argument("--families", default="10,30,100", help="training family counts")
    p.add_argument("--sessions", type=int, default=300, help="training sessions for every N")
    p.add_argument("--train-config", type=Path,
                   default=Path("recipes/smollm2-135m-train.toml"))
    p.add_argument("--eval-config", type=Path, default=Path("recipes/smollm2-135m-eval.toml"))
    p.add_argument("--steps", type=int, help="optimizer steps (default: the train recipe's)")
    p.add_argument("--batch-tokens", type=int,
                   help="tokens per step (default: the train recipe's)")
    p.add_argument("--heldout-families", type=int, default=20)
    p.add_argument("--heldout-seeds", type=int, default=2, help="instances per held-out family")
    p.add_argument("--handwritten-seeds", type=int, default=3,
                   help="held-out instances per hand-written family")
    p.add_argument("--vocab", choices=("open", "closed", "mixed"), default="mixed",
                   help="the training instances' vocabulary (mixed: half open, half closed); "
                        "held-out factory instances are open unless this is closed")
    p.add_argument("--record-args", default="--detours 0.5 --guesses 1 --wrong-help 0.5",
                   help="more sekft.scenarios.record options, one string")
    p.add_argument("--train-args", default="", help="more sekft-train options, one string")
    p.add_argument("--eval-args", default="", help="more sekft-eval options, one string")
    p.add_argument("--baseline", action="store_true", help="also evaluate the base alone")
    p.add_argument("--seen", type=int, default=0, metavar="K",
                   help="also evaluate on K new instances of each N's training families")
    p.add_argument("--jobs", type=int, default=2, help="recording jobs")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    return p.parse_args(argv)


def family_counts(args: argparse.Namespace) -> list[int]:
    return [int(x) for x in args.families.split(",")]


def heldout_vocab(args: argparse.Namespace) -> str:
    """Held-out and seen instances are open-vocabulary unless training is all closed: a
    mixed run is measured on the same sets as an open one."""
    return "closed" if args.vocab == "closed" else "open"


def budget(args: argparse.Namespace) -> tuple[int, int]:
    """(steps, tokens per step): the options given, else the train recipe's."""
    recipe = read_recipe(args.train_config)
    return (args.steps or recipe.get("max-steps", recipe.get("max_steps")),
            args.batch_tokens or recipe.get("batch-tokens", recipe.get("batch_tokens")))


def evaluate(args: argparse.Namespace, out: Path, name: str, adapter: Path | None,
             scenarios: Path | None = None) -> list[str]:
    """sekft-eval of `adapter` (None: the base alone) on held-out set `name`, or on the
    training-family folders in `scenarios`, into OUT/eval-NAME."""
    return command("sekft-eval", "sekft.eval") + [
        "--config", str(args.eval_config), "--base", args.base,
        *(["--adapter", str(adapter)] if adapter else []),
        "--scenarios", str(scenarios or args.work / "heldout" / name),
        "--split", "train" if scenarios else "heldout",
        "--out", str(out / f"eval-{name}"), *shlex.split(args.eval_args)]


def plan(args: argparse.Namespace) -> list[tuple[str, list[str], Path]]:
    """Every step as (title, argv, output), in order; a step whose output is already there
    (written by an earlier run) is skipped."""
    py = [sys.executable, "-m"]
    w = args.work
    steps_, tokens = budget(args)
    steps = [
        ("held-out factory scenarios", py + [
            "sekft.scenarios.factory", "--split", "heldout", "--families",
            str(args.heldout_families), "--seeds", str(args.heldout_seeds), "--vocab",
            heldout_vocab(args), "--out", str(w / "heldout" / "factory")],
         w / "heldout" / "factory"),
        ("hand-written held-out scenarios", py + [
            "sekft.scenarios", "--split", "heldout", "--seeds", str(args.handwritten_seeds),
            "--out", str(w / "heldout" / "handwritten")], w / "heldout" / "handwritten"),
    ]
    if args.baseline:
        steps += [(f"base alone: evaluate on {name}", evaluate(args, w / "n0", name, None),
                   w / "n0" / f"eval-{name}" / "results.json") for name in SETS.values()]
    for n in family_counts(args):
        run = w / f"n{n}"
        steps += [
            (f"N={n}: training scenarios", py + [
                "sekft.scenarios.factory", "--split", "train", "--families", str(n), "--seeds",
                str(math.ceil(args.sessions / n)), "--vocab", args.vocab, "--out",
                str(run / "scenarios")], run / "scenarios"),
            (f"N={n}: record experts", py + [
                "sekft.scenarios.record", "--split", "train", "--scenarios",
                str(run / "scenarios"), "--out", str(run / "train.jsonl"),
                "--jobs", str(args.jobs), *shlex.split(args.record_args)], run / "train.jsonl"),
            (f"N={n}: train", command("sekft-train", "sekft.sft") + [
                "--config", str(args.train_config), "--base", args.base,
                "--data", str(run / "train.jsonl"), "--out", str(run / "adapter"),
                "--overwrite", "--max-steps", str(steps_), "--batch-tokens", str(tokens),
                *shlex.split(args.train_args)], run / "adapter" / "adapter_model.safetensors"),
        ]
        steps += [(f"N={n}: evaluate on {name}", evaluate(args, run, name, run / "adapter"),
                   run / f"eval-{name}" / "results.json") for name in SETS.values()]
        if args.seen:
            families = min(n, SEEN_FAMILIES)
            steps += [
                (f"N={n}: new instances of its training families", py + [
                    "sekft.scenarios.factory", "--split", "train", "--families", str(families),
                    "--seeds", str(math.ceil(args.seen / families)), "--first-seed",
                    str(SEEN_FIRST_SEED), "--vocab", heldout_vocab(args), "--out",
                    str(run / "seen")], run / "seen"),
                (f"N={n}: evaluate on {SEEN}", evaluate(args, run, SEEN, run / "adapter",
                                                         run / "seen"),
                 run / f"eval-{SEEN}" / "results.json"),
            ]
    return steps


def passes(results: Path) -> tuple[int, int]:
    """(passed, episodes) in a sekft-eval results.json, scenario errors left out."""
    episodes = [e for e in json.loads(results.read_text())["episodes"] if not e.get("error")]
    return sum(bool(e["passed"]) for e in episodes), len(episodes)


def training(adapter: Path) -> dict:
    """What the adapter's run logged: steps, tokens, seconds, validation loss."""
    path = adapter / "metrics.jsonl"
    if not path.exists():
        return {}
    metrics = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    val = [m["val_loss"] for m in metrics if "val_loss" in m]
    return {"steps": metrics[-1]["step"], "tokens": sum(m["tokens"] for m in metrics),
            "seconds": round(metrics[-1]["elapsed"], 1),
            "val_loss": round(val[-1], 4) if val else None}


def tally(groups: dict[str, list[int]], key: str, passed: bool) -> None:
    counts = groups.setdefault(key, [0, 0])
    counts[0] += passed
    counts[1] += 1


def factory_breakdown(eval_dir: Path, scenarios: Path) -> dict:
    """Where transfer breaks on held-out factory families: [passed, episodes] by the ending
    the instance wants, by its work and by how its provider documents itself; and
    [episodes that named the provider in a command (found it), episodes]."""
    by_ending: dict[str, list[int]] = {}
    by_work: dict[str, list[int]] = {}
    by_docs: dict[str, list[int]] = {}
    found = [0, 0]
    for line_ in (eval_dir / "transcripts.jsonl").read_text().splitlines():
        episode = json.loads(line_)
        if episode.get("error"):
            continue
        spec = family_spec(int(episode["family"].split("-")[0].removeprefix("fx")))
        meta = json.loads((scenarios / episode["scenario"] / "scenario.json").read_text())
        passed = bool(episode["passed"])
        tally(by_ending, meta["meta"]["key"][-1], passed)
        tally(by_work, spec.work, passed)
        tally(by_docs, spec.docs, passed)
        named = re.compile(rf"(?<![\w.-]){re.escape(spec.name)}(?![\w.-])")
        found[0] += any(m["role"] == "assistant" and named.search(m["content"])
                        for m in episode["messages"])
        found[1] += 1
    return {"by_ending": by_ending, "by_work": by_work, "by_docs": by_docs,
            "named_the_provider": found}


def handwritten_breakdown(results: Path) -> dict:
    """Passes per hand-written family, as [passed, episodes]."""
    by_family: dict[str, list[int]] = {}
    for episode in json.loads(results.read_text())["episodes"]:
        if not episode.get("error"):
            tally(by_family, episode["family"], bool(episode["passed"]))
    return {"by_family": by_family}


def pass_rate(title: str, results: Path) -> dict:
    k, total = passes(results)
    low, high = wilson(k, total)
    return {"title": title, "passed": k, "episodes": total,
            "rate": k / total if total else 0.0, "wilson95": [low, high]}


def result(n: int, work: Path) -> dict:
    """Row N of the curve, as transfer.json stores it."""
    row: dict = {"families": n, "training": training(work / f"n{n}" / "adapter") if n else {}}
    for title, name in SETS.items():
        row[name] = pass_rate(title, work / f"n{n}" / f"eval-{name}" / "results.json")
    seen = work / f"n{n}" / f"eval-{SEEN}" / "results.json"
    if seen.exists():
        row[SEEN] = pass_rate("new instances of its training families", seen)
    evals = work / f"n{n}"
    row["factory"].update(factory_breakdown(evals / "eval-factory", work / "heldout" / "factory"))
    row["handwritten"].update(handwritten_breakdown(evals / "eval-handwritten" / "results.json"))
    return row


def breakdown_lines(row: dict) -> list[str]:
    """The breakdowns of row N, a line each."""
    def cells(groups: dict[str, list[int]]) -> str:
        return ", ".join(f"{key} {k}/{n}" for key, (k, n) in sorted(groups.items()))
    f, h = row["factory"], row["handwritten"]
    k, n = f["named_the_provider"]
    return [f"N={row['families']}: held-out factory by ending: {cells(f['by_ending'])}; "
            f"named the provider in {k}/{n}",
            f"     by work: {cells(f['by_work'])}",
            f"     by docs: {cells(f['by_docs'])}",
            f"     hand-written by family: {cells(h['by_family'])}"]


def line(row: dict) -> str:
    cells = []
    for name in SETS.values():
        s = row[name]
        low, high = s["wilson95"]
        cells.append(f"{s['rate']:5.1%} ({s['passed']}/{s['episodes']}) "
                     f"[{low:.1%}, {high:.1%}]".ljust(WIDTH))
    t = row["training"]
    trained = (f"val {t['val_loss']}, {t['seconds'] / 60:.1f} min" if t.get("val_loss")
               else "base alone" if not row["families"] else "")
    if SEEN in row:
        s = row[SEEN]
        trained += f"; own families {s['passed']}/{s['episodes']}"
    return (f"{row['families']:>4}  " + "  ".join(cells) + trained).rstrip()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    steps = plan(args)
    if args.dry_run:
        print("\n".join(shlex.join(argv) for _, argv, _ in steps))
        return 0
    env = dict(os.environ)
    for title, argv_, output in steps:
        if not output.exists():
            run_step(title, argv_, env)
    steps_, tokens = budget(args)
    rows = [result(n, args.work) for n in ([0] if args.baseline else []) + family_counts(args)]
    cpu = cpu_description()
    print(f"\ntransfer at {args.sessions} sessions, {steps_} steps x {tokens} tokens; "
          f"pass rate (k/n) [95% Wilson]; CPU: {cpu}")
    print(("   N  " + "  ".join(title.ljust(WIDTH) for title in SETS) + "training").rstrip())
    print("\n".join(line(row) for row in rows))
    print("\nwhere it breaks, [passed/episodes]:")
    print("\n".join(text for row in rows for text in breakdown_lines(row)))
    summary = {"sessions": args.sessions, "steps": steps_, "batch_tokens": tokens,
               "train_config": str(args.train_config), "eval_config": str(args.eval_config),
               "record_args": args.record_args, "vocab": args.vocab, "cpu": cpu, "rows": rows}
    write_atomic(args.work / "transfer.json", json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.work / 'transfer.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

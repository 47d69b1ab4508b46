"""The trajectory recorder: experts played through the eval's harness, saved as training data.

Each instance is written as a scenario folder, run by `sekft.eval.run_episode` with its
expert as the policy (so observations come from `sekft.observation`, byte for byte what the
evaluator shows a model), and kept only if the checker passed and every word the expert
copied was on screen first. One JSONL line per episode, in the training-data format:

    {"messages": [{"role": "user"|"assistant", "content": ...}, ...],
     "scenario": id, "family": ..., "split": ..., "seed": ..., "expect": ..., "ending": ...}

    python -m sekft.scenarios.record --split train --seeds 50 --out data/train.jsonl

There is no --no-sandbox: the families' providers keep their state under /usr/local, which
only the sandbox maps into the world; unconfined they would write to this machine's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sekft.errors import ConfigError, ScenarioError, run_cli
from sekft.eval import EpisodeConfig, run_episode
from sekft.scenario import load_scenario
from sekft.scenarios import build, choose_families, describe_split
from sekft.scenarios.expert import expert_policy, unseen_words
from sekft.scenarios.world import Instance, write_scenario


def record_instance(instance: Instance, config: EpisodeConfig) -> dict:
    """Play `instance`'s expert through the harness and return its trajectory record.

    Raises ScenarioError when the expert does not pass its own checker or types a word it
    never saw: either is a bug in the family, and such an episode must not become data.
    """
    with tempfile.TemporaryDirectory(prefix="sekft-record-") as tmp:
        scenario = load_scenario(write_scenario(instance, tmp))
        episode = run_episode(scenario, expert_policy(instance), config, run="expert")
    if not episode.passed:
        raise ScenarioError(f"{instance.id}: the expert failed its checker (ending "
                            f"{episode.ending}): {episode.check_output.strip()!r}; the family "
                            f"{instance.family!r} has a bug")
    unseen = unseen_words(episode.messages)
    if unseen:
        raise ScenarioError(f"{instance.id}: the expert types {unseen} (message index, word) "
                            "before any observation shows it; the family has a bug")
    return {"messages": episode.messages, "scenario": instance.id, "family": instance.family,
            "split": instance.split, "seed": instance.seed, "expect": instance.expect,
            "ending": episode.ending}


def instances(split: str, seeds: Iterable[int], families: Iterable[str]) -> list[Instance]:
    """Every (family, seed) instance of `split`, family-major."""
    return [build(family, seed, split) for family in families for seed in seeds]


def record(todo: list[Instance], config: EpisodeConfig, jobs: int = 1) -> list[dict]:
    """Trajectories of `todo`, in order, `jobs` episodes at a time."""
    if jobs <= 1:
        return [record_instance(i, config) for i in todo]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(lambda i: record_instance(i, config), todo))


def write_jsonl(records: list[dict], out: Path) -> None:
    """Write `records` one JSON object per line, atomically (temp file + os.replace)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    os.fchmod(fd, 0o644)  # mkstemp makes it private; data files are ordinary files
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sekft.scenarios.record",
                                description="Record expert trajectories of the built-in "
                                            "scenario families as training data (JSONL).")
    p.add_argument("--split", choices=("train", "heldout"), required=True)
    p.add_argument("--seeds", type=int, required=True, help="seeds per family")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--families", default=None,
                   help="comma-separated subset of the split's families (default: all)")
    p.add_argument("--out", type=Path, required=True, help="JSONL file to write")
    # Episodes mostly wait on the terminal, so several at once pay off even on 2 cores.
    p.add_argument("--jobs", type=int, default=4, help="episodes run at the same time")
    return p.parse_args(argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    families = choose_families(args.split, args.families)
    if args.seeds <= 0 or args.first_seed < 0 or args.jobs <= 0:
        raise ConfigError("--seeds and --jobs must be positive and --first-seed not negative")
    print(describe_split(), file=sys.stderr)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    records = record(instances(args.split, seeds, families),
                     EpisodeConfig(sandbox=True), args.jobs)
    write_jsonl(records, args.out)
    turns = sum(sum(m["role"] == "assistant" for m in r["messages"]) for r in records)
    print(f"wrote {len(records)} {args.split} trajectories ({turns} commands) of "
          f"{len(families)} families to {args.out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("sekft.scenarios.record", _main, argv)


if __name__ == "__main__":
    sys.exit(main())

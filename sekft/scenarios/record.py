"""The trajectory recorder: experts played through the eval's harness, saved as training data.

Each instance is written as a scenario folder, run by `sekft.eval.run_episode` with its
expert as the policy (so observations come from `sekft.observation`, byte for byte what the
evaluator shows a model), and kept only if the checker passed and every word the expert
copied was on screen first. One JSONL line per episode, in the training-data format:

    {"messages": [{"role": "user"|"assistant", "content": ...}, ...],
     "scenario": id, "family": ..., "split": ..., "seed": ..., "expect": ..., "ending": ...}

    python -m sekft.scenarios.record --split train --seeds 50 --out data/train.jsonl
    python -m sekft.scenarios.record --split train --scenarios DIR --out data/train.jsonl

The second form records scenario folders already written (by `python -m sekft.scenarios`
or the factory, `python -m sekft.scenarios.factory`): each carries its expert's commands.
`--detours P` plays a share P of the instances a second time with one read-only step
repeated and that repeat untrained (sekft.scenarios.detour): the state a looping model
is in, and the step out of it. `--guesses P` plays a share P of the instances whose expert
looks for an unnamed tool in /usr/local/bin again with a wrong guess first (a word of the
directive tried as the tool, untrained): a failed guess, and the step out of it.
`--wrong-help P` plays a share P of the instances whose expert asks a tool for its
documentation again with a wrong way of asking first (`T help` for a tool that takes
`T --help`, untrained): a refused help request, and the form the refusal names.

There is no --no-sandbox: the families' providers keep their state under /usr/local, which
only the sandbox maps into the world; unconfined they would write to this machine's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sekft.errors import ConfigError, ScenarioError, run_cli
from sekft.eval import EpisodeConfig, run_episode
from sekft.scenario import Scenario, load_scenario, load_scenarios
from sekft.scenarios import build, choose_families, describe_split
from sekft.scenarios.detour import (
    detour_step,
    guess_step,
    help_step,
    mark_untrained,
    with_repeat,
    with_step,
    wrong_guess,
    wrong_help,
)
from sekft.scenarios.expert import expert_policy, unseen_words
from sekft.scenarios.world import Instance, write_scenario


def record_instance(instance: Instance, config: EpisodeConfig, detour: bool = False,
                    guess_from: list[dict] | None = None,
                    ask_wrong: bool = False) -> dict | None:
    """Play `instance`'s expert through the harness and return its trajectory record.

    Raises ScenarioError when the expert does not pass its own checker or types a word it
    never saw: either is a bug in the family, and such an episode must not become data.
    """
    with tempfile.TemporaryDirectory(prefix="sekft-record-") as tmp:
        return record_scenario(load_scenario(write_scenario(instance, tmp)), config, detour,
                               guess_from, ask_wrong)


def record_scenario(scenario: Scenario, config: EpisodeConfig, detour: bool = False,
                    guess_from: list[dict] | None = None,
                    ask_wrong: bool = False) -> dict | None:
    """`record_instance` for a scenario folder carrying its expert's commands in
    scenario.json's meta ("expert"), as the built-in suite and the factory write them.

    detour=True plays the expert with one read-only step repeated (`detour_step`) and marks
    the repeat untrained; the record's "detour" is the repeated step. `guess_from`, the
    messages of the plain expert episode, plays it with a wrong guess (`wrong_guess` at a
    word of the observation before `guess_step`) in front of the step that finds the tool,
    the guess untrained; the record's "guess" is the guess's turn. ask_wrong=True plays it
    with a wrong way of asking for help (`wrong_help`) in front of its first request for a
    tool's documentation (`help_step`), untrained; the record's "wrong_help" is its turn.
    Each returns None (no record) when the expert has no such step, no turn to spare, or
    the guessed word turns out to be a program after all, or the wrong way of asking works.
    """
    commands = scenario.meta.get("expert")
    if not (isinstance(commands, list) and commands
            and all(isinstance(c, str) for c in commands)):
        raise ScenarioError(f"{scenario.path}/scenario.json: meta has no 'expert' list of "
                            "command lines; only generated scenarios can be recorded")
    untrained, extra = None, {}
    if detour:
        step = detour_step(commands, scenario.id)
        if step is not None:
            untrained, extra = step + 1, {"detour": step}
            commands = with_repeat(commands, step)
    elif guess_from is not None:
        at = guess_step(commands)
        # the observation the expert read just before it looked for the tool: the directive
        guess = None if at is None else wrong_guess(guess_from[2 * at]["content"], scenario.id)
        if guess is not None:
            untrained, extra = at, {"guess": at}
            commands = with_step(commands, at, guess)
    elif ask_wrong:
        at = help_step(commands)
        if at is not None:
            untrained, extra = at, {"wrong_help": at}
            commands = with_step(commands, at, wrong_help(commands[at], scenario.id))
    if (detour or guess_from is not None or ask_wrong) and (
            untrained is None or len(commands) > scenario.turn_budget):
        return None
    episode = run_episode(scenario, expert_policy(commands, scenario.id), config, run="expert")
    if not episode.passed:
        raise ScenarioError(f"{scenario.id}: the expert failed its checker (ending "
                            f"{episode.ending}): {episode.check_output.strip()!r}; the family "
                            f"{scenario.family!r} has a bug")
    # The untrained step may guess a word in another form than it was shown: nothing
    # learns to copy from it.
    unseen = [(i, w) for i, w in unseen_words(episode.messages)
              if untrained is None or i != 2 * untrained + 1]
    if unseen:
        raise ScenarioError(f"{scenario.id}: the expert types {unseen} (message index, word) "
                            "before any observation shows it; the family has a bug")
    if ("guess" in extra or "wrong_help" in extra) and episode.statuses[untrained] == 0:
        return None  # the guessed word is a program, or that way of asking works: no detour
    messages = (episode.messages if untrained is None
                else mark_untrained(episode.messages, untrained))
    return {"messages": messages, "scenario": scenario.id, "family": scenario.family,
            "split": scenario.split, "seed": scenario.meta.get("seed"),
            "expect": scenario.expect, "ending": episode.ending, **extra}


def instances(split: str, seeds: Iterable[int], families: Iterable[str]) -> list[Instance]:
    """Every (family, seed) instance of `split`, family-major."""
    return [build(family, seed, split) for family in families for seed in seeds]


def detoured(key: str, share: float) -> bool:
    """Whether the instance `key` (its id) also gets a detour, for a `share` of them."""
    return share > 0 and random.Random(f"detour-share:{key}").random() < share


def record(todo: list[Instance] | list[Scenario], config: EpisodeConfig,
           jobs: int = 1, detours: float = 0.0, guesses: float = 0.0,
           wrong_helps: float = 0.0) -> list[dict]:
    """Trajectories of `todo` (instances, or scenario folders with an expert), in order,
    `jobs` episodes at a time; a share `detours` of them also recorded with a repeat, a
    share `guesses` of those whose expert looks for an unnamed tool with a wrong guess, and
    a share `wrong_helps` of those whose expert asks a tool for help with a wrong way of
    asking first (each variant's record right after its original's)."""

    def one(item: Instance | Scenario) -> list[dict]:
        play = record_scenario if isinstance(item, Scenario) else record_instance
        key = item.id
        plain = play(item, config)
        records = [plain]
        if detoured(key, detours):
            records.append(play(item, config, True))
        if detoured(f"guess:{key}", guesses):
            records.append(play(item, config, guess_from=plain["messages"]))
        if detoured(f"wrong-help:{key}", wrong_helps):
            records.append(play(item, config, ask_wrong=True))
        return [r for r in records if r is not None]

    if jobs <= 1:
        return [r for i in todo for r in one(i)]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return [r for records in pool.map(one, todo) for r in records]


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
    p.add_argument("--seeds", type=int, help="seeds per family")
    p.add_argument("--scenarios", type=Path,
                   help="record the scenario folders (of --split) under this folder instead, "
                        "e.g. factory output")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--families", default=None,
                   help="comma-separated subset of the split's families (default: all)")
    p.add_argument("--out", type=Path, required=True, help="JSONL file to write")
    p.add_argument("--detours", type=float, default=0.0,
                   help="share of instances also recorded with one read-only step repeated "
                        "and the repeat untrained (0..1)")
    p.add_argument("--guesses", type=float, default=0.0,
                   help="share of instances whose expert looks for an unnamed tool in "
                        "/usr/local/bin also recorded with a wrong guess first, the guess "
                        "untrained (0..1)")
    p.add_argument("--wrong-help", type=float, default=0.0,
                   help="share of instances whose expert asks a tool for its documentation "
                        "also recorded with a wrong way of asking first (e.g. `T help` for a "
                        "tool that takes `T --help`), that request untrained (0..1)")
    # Episodes mostly wait on the terminal, so several at once pay off even on 2 cores.
    p.add_argument("--jobs", type=int, default=4, help="episodes run at the same time")
    return p.parse_args(argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    if args.jobs <= 0:
        raise ConfigError("--jobs must be positive")
    for name in ("detours", "guesses", "wrong_help"):
        if not 0 <= getattr(args, name) <= 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be a share from 0 to 1, got "
                              f"{getattr(args, name)}")
    if args.scenarios is not None:
        if args.seeds is not None or args.families is not None:
            raise ConfigError("--scenarios records the folders given; leave out --seeds and "
                              "--families")
        todo = load_scenarios(args.scenarios, args.split)
        families = sorted({s.family for s in todo})
    else:
        families = choose_families(args.split, args.families)
        if args.seeds is None or args.seeds <= 0 or args.first_seed < 0:
            raise ConfigError("give --seeds (positive; --first-seed not negative), or "
                              "--scenarios DIR")
        print(describe_split(), file=sys.stderr)
        seeds = range(args.first_seed, args.first_seed + args.seeds)
        todo = instances(args.split, seeds, families)
    records = record(todo, EpisodeConfig(sandbox=True), args.jobs, args.detours, args.guesses,
                     args.wrong_help)
    write_jsonl(records, args.out)
    turns = sum(sum(m["role"] == "assistant" for m in r["messages"]) for r in records)
    detours = sum("detour" in r for r in records)
    guesses = sum("guess" in r for r in records)
    helps = sum("wrong_help" in r for r in records)
    print(f"wrote {len(records)} {args.split} trajectories ({turns} commands; {detours} "
          f"detours, {guesses} wrong guesses, {helps} wrong help requests) of "
          f"{len(families)} families to {args.out}",
          file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("sekft.scenarios.record", _main, argv)


if __name__ == "__main__":
    sys.exit(main())

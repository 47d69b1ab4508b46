"""An evaluation split into shards (`sekft-eval --shard I/N`) and put back together
(`sekft-eval merge RUN_DIR... --out DIR`).

Shard I of N runs every N-th scenario of the suite's order (sorted by family and id),
starting at the I-th, so the shards partition the suite and each holds a share of every
family. Each shard's results.json records its shard and a fingerprint of the whole suite
(`suite_id`). Merging reads the shards' results.json and transcripts.jsonl back into
episodes and writes the three files again through `sekft.eval.write_outputs`, so the rates
and their Wilson intervals are recomputed from the merged counts, never averaged. The merge
refuses shards of different suites or settings, a shard given twice and a shard missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from pathlib import Path

from sekft.errors import ConfigError, DataError
from sekft.eval import Episode, write_outputs

# Settings that change what an episode does: shards run with different ones are not parts
# of one evaluation. Paths (--base, --adapter, --scenarios, --out) may differ per machine;
# the suite is compared by its fingerprint instead.
SAME_SETTINGS = (
    "model", "baseline_model", "split", "baseline", "no_sandbox", "max_new_tokens",
    "temperature", "top_p", "seed", "max_context", "max_output_bytes", "episode_timeout",
    "stall_turns", "load_4bit", "dtype",
)  # fmt: skip


def parse_shard(text: str) -> tuple[int, int]:
    """"I/N" -> (I, N), with 1 <= I <= N; anything else is a ConfigError."""
    index, _, count = text.partition("/")
    if index.isdigit() and count.isdigit() and 1 <= int(index) <= int(count):
        return int(index), int(count)
    raise ConfigError(f"--shard {text!r}: give I/N, shard I of N with 1 <= I <= N (e.g. 2/3)")


def select_shard(items: list, index: int, count: int) -> list:
    """Shard `index` (1-based) of `count` of `items`: items[index - 1], then every count-th.

    Contract: for index = 1..count the shards partition `items`, each keeping their order.
    """
    return items[index - 1 :: count]


def suite_id(scenario_ids: list[str]) -> dict:
    """What identifies a suite across machines: how many scenarios, and a hash of their ids."""
    return {"scenarios": len(scenario_ids),
            "sha256": hashlib.sha256("\n".join(sorted(scenario_ids)).encode()).hexdigest()}


def read_run(folder: Path) -> tuple[dict, list[Episode]]:
    """(config, episodes) of the eval run in `folder`, messages included."""
    try:
        results = json.loads((folder / "results.json").read_text())
        lines = (folder / "transcripts.jsonl").read_text().splitlines()
        transcripts = {(t["run"], t["scenario"]): t["messages"] for t in map(json.loads, lines)}
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{folder}: not a sekft-eval output folder (results.json and "
                        f"transcripts.jsonl): {e}") from None
    names = {f.name for f in dataclasses.fields(Episode)}
    episodes = []
    for record in results["episodes"]:
        facts = {k: v for k, v in record.items() if k in names}
        facts["messages"] = transcripts.get((record["run"], record["scenario"]), [])
        episodes.append(Episode(**facts))
    return results["config"], episodes


def check_shards(configs: dict[Path, dict]) -> int:
    """Refuse shards that are not exactly 1..N of one suite and settings; returns N."""
    first_folder, first = next(iter(configs.items()))
    by_index: dict[int, Path] = {}
    count = None
    for folder, config in configs.items():
        if not config.get("shard"):
            raise ConfigError(f"{folder}: this run was not split with --shard I/N; merge "
                              "combines the shards of one run")
        index, n = parse_shard(config["shard"])
        if count is not None and n != count:
            raise ConfigError(f"{folder} is shard {index}/{n} but {first_folder} is one of "
                              f"{count}; merge the shards of one split")
        count = n
        if index in by_index:
            raise ConfigError(f"shard {index}/{n} given twice: {by_index[index]} and {folder}")
        by_index[index] = folder
        changed = [k for k in ("suite", *SAME_SETTINGS) if config.get(k) != first.get(k)]
        if changed:
            raise ConfigError(f"{folder}: its {', '.join(changed)} differ from {first_folder}'s; "
                              "merge shards of one evaluation")
    missing = [i for i in range(1, count + 1) if i not in by_index]
    if missing:
        raise ConfigError(f"shard {missing[0]}/{count} is missing ({len(by_index)} of {count} "
                          "given); give the output folder of every shard")
    return count


def merge(folders: list[Path], out: Path) -> dict[str, dict]:
    """Merge the shard output `folders` into `out`; returns the runs' recomputed reports.

    Episodes come in the order an unsplit run writes them: run by run (in the order the
    shards list them), and within a run by family and scenario id.
    """
    read = {folder: read_run(folder) for folder in folders}
    count = check_shards({folder: config for folder, (config, _) in read.items()})
    episodes = [e for _, shard in read.values() for e in shard]
    runs = list(dict.fromkeys(e.run for e in episodes))
    episodes.sort(key=lambda e: (runs.index(e.run), e.family, e.scenario))
    config = dict(next(iter(read.values()))[0], shard=None, merged_shards=count,
                  merged_from=[str(f) for f in folders], out=str(out))
    return write_outputs(out, episodes, config)


def merge_main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(
        prog="sekft-eval merge", allow_abbrev=False,
        description="Combine the output folders of `sekft-eval --shard I/N` runs (all N).")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a shard's --out folder")
    parser.add_argument("--out", required=True, help="folder for the merged outputs")
    args = parser.parse_args(argv)
    from sekft.eval import table

    runs = merge([Path(r) for r in args.runs], Path(args.out))
    print(table(runs))
    print(f"wrote {args.out}/results.json, transcripts.jsonl, report.html")
    return 0

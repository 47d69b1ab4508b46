"""bench/transfer.py's plan and its breakdown of where transfer breaks (no model needed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import transfer  # noqa: E402  bench/transfer.py

from sekft.errors import ConfigError  # noqa: E402
from sekft.scenarios.factory import family_seeds, family_spec, generate  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def args_for(tmp_path: Path, *more: str):
    return transfer.parse_args([
        "--base", "B", "--work", str(tmp_path), "--families", "10,30", "--sessions", "45",
        "--train-config", str(REPO / "recipes" / "smollm2-135m-train.toml"),
        "--eval-config", str(REPO / "recipes" / "smollm2-135m-eval.toml"), *more])


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_every_n_gets_the_same_sessions_and_token_budget(tmp_path):
    steps = transfer.plan(args_for(tmp_path, "--steps", "7", "--baseline"))
    titles = [title for title, _, _ in steps]
    scenarios = {t: argv for t, argv, _ in steps if t.endswith("training scenarios")}
    # 45 sessions: 10 families x 5 instances, 30 x 2 (the ceiling: never fewer sessions)
    assert option(scenarios["N=10: training scenarios"], "--seeds") == "5"
    assert option(scenarios["N=30: training scenarios"], "--seeds") == "2"
    trains = [argv for t, argv, _ in steps if t.endswith(": train")]
    assert [option(a, "--max-steps") for a in trains] == ["7", "7"]
    # the recipe's batch tokens, since none was given
    assert [option(a, "--batch-tokens") for a in trains] == ["2048", "2048"]
    base_alone = [argv for t, argv, _ in steps if t.startswith("base alone")]
    assert len(base_alone) == 2 and all("--adapter" not in a for a in base_alone)
    adapted = [argv for t, argv, _ in steps if ": evaluate on" in t and t.startswith("N=")]
    assert len(adapted) == 4 and all("--adapter" in a for a in adapted)
    assert titles.index("N=10: train") < titles.index("N=10: evaluate on factory")
    assert not any("seen" in t for t in titles)


def test_a_mixed_vocabulary_trains_mixed_and_measures_on_open_instances(tmp_path):
    # mixed and the three kinds of detour are the defaults: what the best row measured
    steps = {t: argv for t, argv, _ in transfer.plan(args_for(tmp_path, "--seen", "40"))}
    record = steps["N=10: record experts"]
    assert [option(record, o) for o in ("--detours", "--guesses", "--wrong-help")] == [
        "0.5", "1", "0.5"]
    assert option(steps["N=10: training scenarios"], "--vocab") == "mixed"
    assert option(steps["held-out factory scenarios"], "--vocab") == "open"
    assert option(steps["N=10: new instances of its training families"], "--vocab") == "open"
    closed = {t: argv for t, argv, _ in transfer.plan(args_for(tmp_path, "--vocab", "closed"))}
    assert option(closed["held-out factory scenarios"], "--vocab") == "closed"


def test_seen_evaluates_new_instances_of_the_adapters_own_families(tmp_path):
    steps = {t: argv for t, argv, _ in transfer.plan(args_for(tmp_path, "--seen", "40"))}
    written = steps["N=30: new instances of its training families"]
    # at most 20 of the 30 training families, 2 instances each, from a seed none used
    assert option(written, "--split") == "train" and option(written, "--families") == "20"
    assert option(written, "--seeds") == "2"
    assert int(option(written, "--first-seed")) >= 45  # above every training instance seed
    assert option(steps["N=10: new instances of its training families"], "--seeds") == "4"
    evaluated = steps["N=30: evaluate on seen"]
    assert option(evaluated, "--split") == "train"
    assert option(evaluated, "--scenarios") == option(written, "--out")
    assert option(evaluated, "--adapter") == str(tmp_path / "n30" / "adapter")


def test_the_breakdown_counts_passes_by_ending_and_who_named_the_provider(tmp_path):
    scenarios = tmp_path / "heldout" / "factory"
    seeds = family_seeds("heldout", 2)
    folders = [generate(seed, 0, scenarios) for seed in seeds]
    names = [family_spec(seed).name for seed in seeds]
    episodes = []
    for folder, name, passed, said in zip(folders, names, (True, False), (
            "{name} --help", "{name}x --help; echo {name}.txt"), strict=True):
        meta = json.loads((folder / "scenario.json").read_text())
        episodes.append({
            "scenario": meta["id"], "family": meta["family"], "passed": passed, "error": None,
            "messages": [{"role": "user", "content": f"{name} is here"},
                         {"role": "assistant", "content": said.format(name=name)}]})
    episodes.append({**episodes[0], "error": "sandbox failed"})  # left out
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "transcripts.jsonl").write_text(
        "".join(json.dumps(e) + "\n" for e in episodes))
    got = transfer.factory_breakdown(tmp_path / "ev", scenarios)
    # the first episode named its provider; the second only a longer word and a file name
    assert got["named_the_provider"] == [1, 2]
    endings = [json.loads((f / "scenario.json").read_text())["meta"]["key"][-1]
               for f in folders]
    want: dict[str, list[int]] = {}
    for ending, passed in zip(endings, (1, 0), strict=True):
        want.setdefault(ending, [0, 0])
        want[ending][0] += passed
        want[ending][1] += 1
    assert got["by_ending"] == want
    assert sum(n for _, n in got["by_work"].values()) == 2


def test_budget_refuses_a_missing_recipe(tmp_path):
    args = args_for(tmp_path)
    args.train_config = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="nope.toml"):
        transfer.budget(args)

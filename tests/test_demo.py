"""`make demo` (python -m sekft.demo): the side-by-side table from sekft-eval's episodes,
the groups it reports, its bad-input behaviour, and (slow) the whole demo end to end."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sekft import demo
from sekft.default_base import ADAPTER_FAMILIES, BASE_FAMILIES, DEFAULT_BASE
from sekft.scenarios import FAMILIES, HELDOUT_FAMILIES


def episode(family: str, run: str, passed: bool, ending: str, modes: list[bool]) -> dict:
    """An episode as sekft-eval's results.json lists it (the fields the demo reads)."""
    return {"family": family, "run": run, "passed": passed, "ending": ending,
            "command_mode": modes, "error": None}


def test_every_suite_family_is_in_exactly_one_group():
    groups = [demo.group_of(f) for f in FAMILIES]
    assert sorted(groups) == sorted(
        ["base families"] * len(BASE_FAMILIES) + ["adapter families"] * len(ADAPTER_FAMILIES)
        + ["held-out families"] * len(HELDOUT_FAMILIES))


def test_group_rates_count_pass_termination_and_command_mode_per_group_and_run():
    adapter_family, base_family = ADAPTER_FAMILIES[0], BASE_FAMILIES[0]
    episodes = [
        episode(adapter_family, "adapter", True, "exit", [True, True, True]),
        episode(adapter_family, "adapter", False, "budget", [True, False]),
        episode(adapter_family, "base", False, "panic", [False]),
        episode(base_family, "base", True, "exit", [True]),
    ]
    rates = demo.group_rates(episodes)
    assert rates[("adapter families", "adapter")] == {
        "pass": (1, 2), "terminated": (1, 2), "command mode": (4, 5)}
    assert rates[("adapter families", "base")] == {
        "pass": (0, 1), "terminated": (1, 1), "command mode": (0, 1)}
    assert ("base families", "adapter") not in rates


def test_group_rates_leave_scenario_errors_out():
    broken = dict(episode(BASE_FAMILIES[0], "base", False, "exit", []), error="setup failed")
    assert demo.group_rates([broken]) == {}


def test_table_puts_both_runs_of_a_group_on_adjacent_rows():
    family = ADAPTER_FAMILIES[0]
    lines = demo.side_by_side([
        episode(family, "adapter", True, "exit", [True]),
        episode(family, "base", False, "budget", [False]),
    ]).splitlines()
    assert lines[0].split()[:2] == ["group", "run"]
    assert "base alone" in lines[1] and "0% (0/1)" in lines[1]
    assert "base + adapter" in lines[2] and "100% (1/1)" in lines[2]


def test_demo_without_a_base_says_how_to_build_one(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sekft.demo", "--base", str(tmp_path / "none"),
         "--work", str(tmp_path / "work")], capture_output=True, text=True)
    assert result.returncode != 0
    assert "make base" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.skipif(not (DEFAULT_BASE / "model.safetensors").exists(),
                    reason="the default base is not built (make base)")
def test_demo_runs_end_to_end_and_prints_both_rows_per_group(tmp_path):
    result = subprocess.run([sys.executable, "-m", "sekft.demo", "--work", str(tmp_path)],
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-2000:]
    table = result.stdout.split("base alone vs base + adapter")[1]
    for group in demo.GROUPS:
        rows = [line for line in table.splitlines() if line.startswith(group)]
        assert [("base + adapter" in r) for r in rows] == [False, True]


def test_real_demo_groups_split_trained_from_never_trained_families_with_intervals():
    from sekft import demo_real

    assert sorted(demo.group_of(f, demo_real.GROUPS) for f in FAMILIES) == sorted(
        ["trained families"] * (len(FAMILIES) - len(HELDOUT_FAMILIES))
        + ["never-trained families"] * len(HELDOUT_FAMILIES))
    episodes = [episode("ledger", "adapter", True, "exit", [True])] * 4 + [
        episode("ticket", "adapter", False, "budget", [False])]
    table = demo.side_by_side(episodes, demo_real.GROUPS)
    assert "trained families        base + adapter  100% (4/4)  51%-100%" in table
    assert "never-trained families  base + adapter    0% (0/1)  0%-79%" in table


def test_real_demo_without_the_converted_model_says_how_to_get_it(tmp_path, capsys):
    from sekft import demo_real

    assert demo_real.main(["--base", str(tmp_path / "none"), "--work", str(tmp_path)]) == 1
    assert "run `make real-base`" in capsys.readouterr().err


def test_real_demo_spreads_its_checkpoints_evenly_and_skips_the_curve_when_asked():
    from sekft import demo_real

    assert demo_real.save_every(48, 4) == 12
    assert demo_real.save_every(30, 4) == 8  # checkpoints at 8, 16, 24 and the end, 30
    assert demo_real.save_every(2, 5) == 1
    assert demo_real.save_every(48, 0) == 0
    assert demo_real.save_every(None, 3) == 0


def test_real_demo_curve_reads_each_checkpoints_time_tokens_and_pass_rates(tmp_path):
    import json

    from sekft import demo_real

    run = tmp_path / "adapter"
    for name in ("checkpoint-10", "checkpoint-5", "checkpoint-x", "checkpoint-7"):
        (run / name).mkdir(parents=True)
    for name in ("checkpoint-10", "checkpoint-5", "checkpoint-x"):
        (run / name / "adapter_config.json").write_text("{}")
    # checkpoint-7 holds no adapter (a save cut short), checkpoint-x is no step
    assert [step for step, _ in demo_real.checkpoints(run)] == [5, 10]
    assert [step for step, _ in demo_real.curve_checkpoints(run, 10)] == [5]
    metrics = run / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "elapsed": 3.0 * s, "tokens": 100 + s})
                               + "\n" for s in range(1, 11)))
    episodes = [episode("ledger", "adapter", True, "exit", [True])] * 3 + [
        episode("ledger", "adapter", False, "budget", [True]),
        episode("ticket", "adapter", True, "exit", [True]),
        episode("ticket", "base", True, "exit", [True]),  # the base's rows are not the curve's
    ]
    point = demo_real.curve_point(5, metrics, episodes)
    assert point == {"step": 5, "train_seconds": 15.0, "tokens": 5 * 100 + 15,
                     "groups": {"trained families": {"pass": [3, 4], "terminated": [3, 4]},
                                "never-trained families": {"pass": [1, 1],
                                                           "terminated": [1, 1]}}}
    lines = demo_real.curve_table([point, demo_real.curve_point(10, metrics, [])]).splitlines()
    assert lines[1].split()[:5] == ["5", "15", "s", "515", "75%"]
    assert "(3/4) [30%-95%]" in lines[1] and "(1/1) [21%-100%]" in lines[1]
    assert lines[2].split() == ["10", "30", "s", "1,055", "-", "-"]


def test_real_demo_groups_generated_held_out_families_apart_from_the_suite(tmp_path):
    import json

    from sekft import demo_real

    def scenario(name, family):
        (tmp_path / name).mkdir()
        (tmp_path / name / "scenario.json").write_text(json.dumps({"family": family}))

    scenario("ledger-heldout-0", "ledger")
    scenario("ticket-heldout-0", "ticket")
    assert demo_real.demo_groups(tmp_path) == demo_real.GROUPS  # no generated group
    scenario("fx7-somofor-heldout-0", "fx7-somofor")
    scenario("fx12-bal-heldout-0", "fx12-bal")
    groups = demo_real.demo_groups(tmp_path)
    assert groups[demo_real.GENERATED] == ("fx12-bal", "fx7-somofor")
    assert {k: v for k, v in groups.items() if k != demo_real.GENERATED} == demo_real.GROUPS
    episodes = [episode("fx7-somofor", "adapter", True, "exit", [True]),
                episode("fx12-bal", "adapter", False, "panic", [True]),
                episode("ledger", "adapter", True, "exit", [True])]
    table = demo.side_by_side(episodes, groups)
    assert "held-out generated families  base + adapter   50% (1/2)" in table
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 1, "elapsed": 2.0, "tokens": 50}) + "\n")
    point = demo_real.curve_point(1, metrics, episodes, groups)
    assert point["groups"][demo_real.GENERATED]["pass"] == [1, 2]
    header, row = demo_real.curve_table([point], groups).splitlines()
    assert header.endswith("pass: held-out generated families")
    assert row.endswith("50% (1/2) [9%-91%]")

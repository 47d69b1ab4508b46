import json
import shutil
from pathlib import Path

import pytest

from sekft.errors import ScenarioError
from sekft.scenario import load_scenario, load_scenarios, parse_scenario_json

FIXTURES = Path(__file__).parent / "fixtures" / "scenarios"

VALID = {
    "id": "a-1", "family": "fam", "split": "heldout", "expect": "exit",
    "turn_budget": 5, "command_timeout": 2.5, "description": "d",
}


def _copy(tmp_path, name="write-done"):
    dst = tmp_path / name
    shutil.copytree(FIXTURES / name, dst)
    return dst


def test_fixture_scenario_loads_with_typed_fields():
    s = load_scenario(FIXTURES / "write-done")
    assert (s.id, s.family, s.split, s.expect) == ("write-done", "notes", "heldout", "exit")
    assert s.turn_budget == 6 and s.command_timeout == 5.0
    assert s.files_dir == FIXTURES.resolve() / "write-done" / "files"


def test_suite_is_sorted_by_family_then_id_and_filtered_by_split():
    ids = [s.id for s in load_scenarios(FIXTURES)]
    assert ids == ["blocked-key", "write-done"]
    with pytest.raises(ScenarioError, match="no scenarios with split 'train'"):
        load_scenarios(FIXTURES, split="train")


@pytest.mark.parametrize("missing", ["scenario.json", "setup.sh", "check.sh"])
def test_missing_file_is_named(tmp_path, missing):
    folder = _copy(tmp_path)
    (folder / missing).unlink()
    with pytest.raises(ScenarioError, match=f"missing \\['{missing}'\\]"):
        load_scenario(folder)


def test_malformed_json_names_file_and_line(tmp_path):
    folder = _copy(tmp_path)
    (folder / "scenario.json").write_text('{\n"id": "x",\n oops\n}')
    with pytest.raises(ScenarioError, match=r"scenario\.json:3: not valid JSON"):
        load_scenario(folder)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("split", "test", "'split': 'test' must be one of"),
        ("expect", "done", "'expect': 'done' must be one of"),
        ("turn_budget", 0, "'turn_budget': 0 must be a positive integer"),
        ("turn_budget", 2.5, "'turn_budget': 2.5 must be a positive integer"),
        ("command_timeout", "10", "'command_timeout': '10' must be a positive finite number"),
        ("command_timeout", float("nan"), "'command_timeout': nan must be a positive finite"),
        ("command_timeout", float("inf"), "'command_timeout': inf must be a positive finite"),
        ("turn_budget", float("inf"), "'turn_budget': inf must be a positive integer"),
        ("id", "Has Space", "'id': 'Has Space' is not a name"),
    ],
)
def test_bad_field_value_is_named(key, value, message):
    with pytest.raises(ScenarioError, match=message):
        parse_scenario_json(json.dumps({**VALID, key: value}), "s.json")


def test_nan_and_infinity_in_the_file_are_named_in_one_line(tmp_path):
    folder = _copy(tmp_path)
    for literal in ("NaN", "Infinity"):
        text = json.dumps({**VALID, "command_timeout": 1}).replace(": 1,", f": {literal},")
        (folder / "scenario.json").write_text(text)
        with pytest.raises(ScenarioError, match=r"scenario\.json: field 'command_timeout'"):
            load_scenario(folder)


def test_non_utf8_scenario_json_is_one_line_naming_the_file(tmp_path, capsys):
    from sekft.eval import main

    folder = _copy(tmp_path)
    (folder / "scenario.json").write_bytes(json.dumps(VALID).encode().replace(b'"d"', b'"\xe9"'))
    with pytest.raises(ScenarioError, match=r"scenario\.json: not UTF-8 \(byte \d+ is 0xe9\)"):
        load_scenario(folder)
    assert main(["--base", "x", "--scenarios", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "scenario.json: not UTF-8" in err


def test_missing_and_unknown_keys_are_errors():
    without = {k: v for k, v in VALID.items() if k != "family"}
    with pytest.raises(ScenarioError, match=r"missing field\(s\) \['family'\]"):
        parse_scenario_json(json.dumps(without), "s.json")
    with pytest.raises(ScenarioError, match=r"unknown field\(s\) \['turn_budjet'\]"):
        parse_scenario_json(json.dumps({**VALID, "turn_budjet": 3}), "s.json")


def test_files_folder_may_only_mirror_the_world(tmp_path):
    folder = _copy(tmp_path)
    (folder / "files" / "etc").mkdir()
    with pytest.raises(ScenarioError, match=r"unexpected \['etc'\]"):
        load_scenario(folder)


def test_duplicate_ids_in_a_suite_are_an_error(tmp_path):
    _copy(tmp_path)
    shutil.copytree(FIXTURES / "write-done", tmp_path / "again")
    with pytest.raises(ScenarioError, match="id 'write-done' is also used"):
        load_scenarios(tmp_path)

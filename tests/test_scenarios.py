"""The built-in scenario suite: generators, split, experts and the trajectory recorder."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from sekft.data import read_sessions
from sekft.errors import ConfigError, ScenarioError
from sekft.eval import EpisodeConfig, replay, run_episode
from sekft.mask import encode_sessions
from sekft.mask import main as mask_main
from sekft.sandbox import find_bwrap
from sekft.scenario import load_scenario, load_scenarios
from sekft.scenarios import (
    FAMILIES,
    HELDOUT_FAMILIES,
    TRAIN_FAMILIES,
    build,
    describe_split,
    families_of,
    generate,
)
from sekft.scenarios.__main__ import main as suite_main
from sekft.scenarios.expert import unseen_words
from sekft.scenarios.posts import POSTS
from sekft.scenarios.record import main as record_main
from sekft.scenarios.record import record, record_instance
from sekft.scenarios.split import key_is_heldout
from sekft.scenarios.words import WORDS
from sekft.scenarios.world import write_scenario
from sekft.template import ChatTemplate
from sekft.tokenizer import load_tokenizer

TEMPLATES = Path(__file__).parent / "fixtures" / "templates"
needs_bwrap = pytest.mark.skipif(find_bwrap() is None, reason="needs bubblewrap")


def world_bytes(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under a scenario folder: relative path -> (mode, bytes)."""
    return {str(p.relative_to(folder)): (p.stat().st_mode, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def splits_of(family: str) -> list[str]:
    return ["heldout"] if family in HELDOUT_FAMILIES else ["train", "heldout"]


@pytest.fixture(scope="module")
def expert_records() -> dict[str, dict]:
    """One recorded expert episode per family (held-out seed 0), through the sandbox."""
    if find_bwrap() is None:
        pytest.skip("needs bubblewrap")
    todo = [build(family, 0, "heldout") for family in FAMILIES]
    return {r["family"]: r for r in record(todo, EpisodeConfig(), jobs=2)}


# The suite as a whole


def test_suite_has_ten_families_and_two_never_trained():
    assert len(FAMILIES) >= 10
    assert len(HELDOUT_FAMILIES) >= 2
    assert not set(TRAIN_FAMILIES) & set(HELDOUT_FAMILIES)
    assert set(TRAIN_FAMILIES) | set(HELDOUT_FAMILIES) == set(FAMILIES)


def test_split_description_names_every_family():
    text = describe_split()
    assert all(family in text for family in FAMILIES)


def test_at_least_two_families_always_expect_panic():
    always_panic = [f for f in FAMILIES
                    if all(build(f, s, "heldout").expect == "panic" for s in range(10))]
    assert len(always_panic) >= 2


def test_words_are_distinct_lowercase_and_about_three_hundred():
    assert 250 <= len(WORDS) <= 350
    assert len(set(WORDS)) == len(WORDS)
    assert all(w.isalpha() and w.islower() for w in WORDS)


# Generators: determinism and variety


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_writes_the_same_world_bytes(family, tmp_path):
    split = splits_of(family)[0]
    first = generate(family, 5, tmp_path / "a", split)
    second = generate(family, 5, tmp_path / "b", split)
    assert world_bytes(first) == world_bytes(second)


@pytest.mark.parametrize("family", FAMILIES)
def test_different_seeds_give_different_tasks_worlds_and_wordings(family):
    instances = [build(family, seed, "heldout") for seed in range(12)]
    assert len({i.key for i in instances}) >= 10
    assert len({tuple(sorted(i.files.items())) for i in instances}) == 12
    assert len({skeleton(i) for i in instances}) >= 4


def skeleton(instance) -> str:
    """The instance's readable texts (banner, mail, home files) with every closed-list word
    and number blanked: what is left is the wording and the layout."""
    texts = [f"{path}={data.decode()}" for path, data in sorted(instance.files.items())
             if path == "motd" or path.startswith("mail/")
             or (path.startswith("home/") and not path.endswith(".gz"))]
    return re.sub(r"[a-z]+|[0-9]+", lambda m: "W" if m[0] in WORDS or m[0].isdigit() else m[0],
                  "\n".join(texts))


def _tool(instance) -> str:
    return next(p.split("/")[-1] for p in instance.executables)


def test_directives_are_found_in_every_kind_of_post():
    kinds = {build(f, seed, "heldout").description.rsplit("directive: ", 1)[1].rstrip(").")
             for f in FAMILIES for seed in range(6)}
    assert kinds == set(POSTS)


@pytest.mark.parametrize("family", FAMILIES)
def test_generated_folder_loads_as_a_scenario_of_its_family(family, tmp_path):
    split = splits_of(family)[-1]
    scenario = load_scenario(generate(family, 3, tmp_path, split))
    instance = build(family, 3, split)
    assert (scenario.family, scenario.split, scenario.expect) == (family, split, instance.expect)
    assert scenario.turn_budget > len(instance.commands)
    assert scenario.meta["seed"] == 3


@pytest.mark.parametrize("family", FAMILIES)
def test_provider_tool_is_documented_by_help_and_a_man_page(family):
    instance = build(family, 0, "heldout")
    tool = _tool(instance)
    assert f"local/share/man/man1/{tool}.1" in instance.files
    assert f"{tool} --help" in instance.commands


def test_lookup_table_has_one_line_containing_the_item_and_none_its_answer_alone():
    for seed in range(60):
        instance = build("lookup", seed)
        table, item, answer = instance.key
        lines = instance.files[f"home/data/{table}.txt"].decode().splitlines()
        assert [line for line in lines if item in line] == [f"{item} {answer}"]


def test_tally_log_has_the_word_on_exactly_count_lines():
    for seed in range(60):
        instance = build("tally", seed)
        log, word, count = instance.key
        lines = instance.files[f"home/logs/{log}.log"].decode().splitlines()
        assert sum(word in line for line in lines) == count


def test_writing_over_an_existing_scenario_is_refused(tmp_path):
    generate("ledger", 1, tmp_path)
    with pytest.raises(ConfigError, match="already exists"):
        generate("ledger", 1, tmp_path)


# The split


@pytest.mark.parametrize("family", TRAIN_FAMILIES)
def test_heldout_instances_never_ask_what_training_ones_ask(family):
    train = {build(family, s, "train").key for s in range(150)}
    heldout = {build(family, s, "heldout").key for s in range(40)}
    assert not train & heldout
    assert all(key_is_heldout(family, k) for k in heldout)


def test_heldout_family_has_no_training_instances():
    with pytest.raises(ConfigError, match="held out entirely"):
        build(HELDOUT_FAMILIES[0], 0, "train")


def test_every_family_has_heldout_instances_and_only_training_families_train():
    assert set(families_of("heldout")) == set(FAMILIES)
    assert set(families_of("train")) == set(TRAIN_FAMILIES)


# Experts through the sandboxed harness


@needs_bwrap
@pytest.mark.parametrize("family", FAMILIES)
def test_expert_passes_its_checker_with_the_expected_ending(family, expert_records):
    record_ = expert_records[family]
    assert record_["ending"] == record_["expect"]
    assert record_["messages"][-1] == {"role": "assistant",
                                       "content": build(family, 0, "heldout").commands[-1]}


@needs_bwrap
@pytest.mark.parametrize("family", FAMILIES)
def test_expert_only_types_words_an_observation_showed_first(family, expert_records):
    assert unseen_words(expert_records[family]["messages"]) == []


@needs_bwrap
def test_expert_discovers_before_it_works(expert_records):
    for family, record_ in expert_records.items():
        commands = [m["content"] for m in record_["messages"] if m["role"] == "assistant"]
        assert commands[0].split()[0] in ("ls", "cat"), family
        assert any(c.endswith(" --help") for c in commands), family


@needs_bwrap
def test_doing_the_work_but_panicking_fails_the_check(tmp_path):
    instance = build("ledger", 2)
    scenario = load_scenario(write_scenario(instance, tmp_path))
    wrong = [*instance.commands[:-1], 'panic "not sure"']
    episode = run_episode(scenario, replay(wrong), EpisodeConfig())
    assert episode.ending == "panic"
    assert episode.passed is False


@needs_bwrap
def test_panicking_without_trying_fails_the_check(tmp_path):
    instance = build("deploy", 2)
    scenario = load_scenario(write_scenario(instance, tmp_path))
    episode = run_episode(scenario, replay(['panic "no token"']), EpisodeConfig())
    assert episode.ending == "panic"
    assert episode.passed is False


@needs_bwrap
def test_man_page_is_readable_in_the_sandbox(tmp_path):
    scenario = load_scenario(write_scenario(build("relay", 0), tmp_path))
    episode = run_episode(scenario, replay(["man relay", "exit"]), EpisodeConfig())
    page = episode.messages[2]["content"]
    assert "relay send PERSON FILE" in page
    assert "\b" not in page


@needs_bwrap
def test_man_page_reads_as_a_person_sees_it_on_an_80_column_terminal(tmp_path):
    scenario = load_scenario(write_scenario(build("ledger", 0), tmp_path))
    episode = run_episode(scenario, replay(["man ledger", "exit"]), EpisodeConfig())
    *page, prompt = episode.messages[2]["content"].split("\n")
    assert "NAME" in page and "NNAAMMEE" not in "\n".join(page)
    assert "       ledger add ITEM COUNT" in page
    # No padding to a 500-column terminal: the page fits 80 columns and ends no line in
    # spaces, so the observation cap is spent on the page.
    assert max(len(line) for line in page) <= 80
    assert all(line == line.rstrip() for line in page) and prompt == "user@sandbox:~$ "


def test_unseen_words_flags_a_word_typed_before_it_was_shown():
    messages = [{"role": "user", "content": "Welcome.\n$ "},
                {"role": "assistant", "content": "cat apple.txt"},
                {"role": "user", "content": "one apple and 7 pears\n$ "},
                {"role": "assistant", "content": "ledger add apple 7"}]
    assert unseen_words(messages) == [(1, "apple")]


def test_unseen_words_flags_a_word_shown_only_in_another_form():
    messages = [{"role": "user", "content": "Send docs/apple.txt\n$ "},
                {"role": "assistant", "content": "relay send apple docs/apple.txt"}]
    assert unseen_words(messages) == [(1, "apple")]


# The recorder


@needs_bwrap
def test_recorded_trajectories_pass_every_mask_check(expert_records, tiny_llama):
    sessions = [r["messages"] for r in expert_records.values()]
    for folder in (tiny_llama, TEMPLATES / "smollm2", TEMPLATES / "mistral-7b-instruct-v0.2"):
        encoded = encode_sessions(sessions, ChatTemplate.from_folder(folder),
                                  load_tokenizer(folder))
        assert [e.violations for e in encoded] == [[] for _ in sessions], folder.name


@needs_bwrap
def test_recording_an_instance_twice_gives_the_same_trajectory(expert_records):
    again = record_instance(build("unpack", 0, "heldout"), EpisodeConfig())
    assert again == expert_records["unpack"]


@needs_bwrap
def test_record_cli_writes_training_data_jsonl(tmp_path, capsys):
    out = tmp_path / "data" / "ticket.jsonl"
    code = record_main(["--split", "heldout", "--seeds", "2", "--families", "ticket",
                        "--out", str(out)])
    sessions = read_sessions(out)
    assert code == 0
    assert [(s.extra["scenario"], s.extra["split"]) for s in sessions] == [
        ("ticket-heldout-0", "heldout"), ("ticket-heldout-1", "heldout")]
    assert "wrote 2 heldout trajectories" in capsys.readouterr().err


@needs_bwrap
def test_recorded_file_passes_mask_inspect_strict(tmp_path, tiny_llama, capsys):
    out = tmp_path / "relay.jsonl"
    record_main(["--split", "train", "--seeds", "1", "--families", "relay,vault",
                 "--out", str(out)])
    code = mask_main(["--inspect", "--strict", "--data", str(out), "--base", str(tiny_llama)])
    assert code == 0
    assert "2 sessions" in capsys.readouterr().out


def test_record_cli_refuses_a_family_outside_the_split(tmp_path, capsys):
    code = record_main(["--split", "train", "--seeds", "1", "--families", "ticket",
                        "--out", str(tmp_path / "x.jsonl")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and "ticket" in err


def test_suite_cli_writes_loadable_scenario_folders(tmp_path, capsys):
    code = suite_main(["--split", "heldout", "--seeds", "2", "--families", "ticket,ledger",
                       "--out", str(tmp_path)])
    scenarios = load_scenarios(tmp_path, split="heldout")
    assert code == 0
    assert [s.id for s in scenarios] == ["ledger-heldout-0", "ledger-heldout-1",
                                         "ticket-heldout-0", "ticket-heldout-1"]


def test_suite_cli_prints_the_split(capsys):
    assert suite_main(["--show-split"]) == 0
    assert capsys.readouterr().out.strip() == describe_split()


@needs_bwrap
def test_record_refuses_an_expert_that_fails_its_checker():
    instance = build("tally", 0)
    broken = replace(instance, commands=(*instance.commands[:-2], "tally submit 0", "exit"))
    with pytest.raises(ScenarioError, match="failed its checker"):
        record_instance(broken, EpisodeConfig())


# The acceptance sweep


@needs_bwrap
@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_expert_passes_twenty_seeds_of_every_split(family):
    todo = [build(family, seed, split) for split in splits_of(family) for seed in range(20)]
    records = record(todo, EpisodeConfig(), jobs=4)
    assert [r["ending"] for r in records] == [i.expect for i in todo]


# ---- detours: a read-only step repeated, the repeat untrained -------------------------------

@pytest.mark.parametrize(("command", "read_only"), [
    ("ls", True), ("cat NOTE", True), ("cat $MAIL", True), ("man ledger", True),
    ("ledger --help", True), ("relupo -h", True), ("ticket help", True),
    ("grep -c fig data/a.txt", True), ("ledger add fig", False), ("tar xzf a.tar.gz", False),
    ("cat a > b", False), ("grep x a | wc -l", False), ("cat $(ls)", False),
    ("ls; rm x", False), ("cd orders", False), ("exit", False), ("cat 'open", False), ("", False),
])
def test_only_a_command_that_reads_and_prints_is_repeated(command, read_only):
    from sekft.scenarios.detour import is_read_only

    assert is_read_only(command) is read_only


def test_the_detour_step_is_read_only_never_the_ending_and_fixed_by_the_key():
    from sekft.scenarios.detour import detour_step, mark_untrained, with_repeat

    commands = ["ls", "cat NOTE", "ledger add fig", "ledger --help", "exit"]
    steps = {detour_step(commands, f"s-{n}") for n in range(200)}
    assert steps == {0, 1, 3}
    assert detour_step(commands, "s-7") == detour_step(list(commands), "s-7")
    assert detour_step(["ledger add fig", "ls"], "k") is None  # only the ending reads
    assert with_repeat(commands, 1) == ["ls", "cat NOTE", "cat NOTE", "ledger add fig",
                                        "ledger --help", "exit"]
    messages = [{"role": r, "content": c} for r, c in [
        ("user", "login"), ("assistant", "ls"), ("user", "NOTE"), ("assistant", "ls"),
        ("user", "NOTE"), ("assistant", "exit")]]
    marked = mark_untrained(messages, 1)
    assert [m.get("weight") for m in marked] == [None, None, None, 0, None, None]
    assert "weight" not in messages[3]  # the input is left as it was
    with pytest.raises(ValueError, match="no turn 3"):
        mark_untrained(messages, 3)


@needs_bwrap
def test_a_detour_is_played_in_the_sandbox_and_trains_only_the_step_after_it(
        expert_records, tiny_llama):
    from sekft.mask import IGNORE
    from sekft.scenarios.detour import detour_step

    for family in ("lookup", "ticket"):
        plain = expert_records[family]
        instance = build(family, 0, "heldout")
        detour = record_instance(instance, EpisodeConfig(), detour=True)
        step = detour_step(list(instance.commands), instance.id)
        assert detour["detour"] == step and detour["ending"] == plain["ending"]
        said = [m for m in detour["messages"] if m["role"] == "assistant"]
        assert [m.get("weight", 1) for m in said].count(0) == 1
        assert said[step + 1] == {**said[step], "weight": 0}
        # the repeat's observation is what the shell printed the first time too
        m = detour["messages"]
        at = m.index(said[step + 1])
        assert m[at + 1] == m[at - 1]
        # without the repeat pair, the episode is the expert's own
        assert m[:at] + m[at + 2:] == plain["messages"]
        folder = TEMPLATES / "smollm2"
        template, tokenizer = ChatTemplate.from_folder(folder), load_tokenizer(folder)
        encoded, reference = encode_sessions([m, plain["messages"]], template, tokenizer)
        assert encoded.violations == []
        trained = [t for t in encoded.labels if t != IGNORE]
        assert trained == [t for t in reference.labels if t != IGNORE]


@needs_bwrap
def test_record_cli_detours_a_share_of_the_instances(tmp_path, capsys):
    out = tmp_path / "d.jsonl"
    assert record_main(["--split", "train", "--seeds", "4", "--families", "lookup,relay",
                        "--detours", "1", "--out", str(out)]) == 0
    sessions = read_sessions(out)
    detours = [s for s in sessions if "detour" in s.extra]
    assert len(sessions) - len(detours) == 8 and len(detours) >= 4
    for n, s in enumerate(sessions):
        if "detour" in s.extra:  # right after its original
            assert sessions[n - 1].extra["scenario"] == s.extra["scenario"]
    assert f"{len(detours)} detours" in capsys.readouterr().err
    assert record_main(["--split", "train", "--seeds", "1", "--detours", "2",
                        "--out", str(out)]) == 1
    assert "--detours must be a share from 0 to 1, got 2.0" in capsys.readouterr().err

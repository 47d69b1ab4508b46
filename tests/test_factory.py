"""The scenario factory: family specs from a seed, instances with experts, the split."""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from sekft.data import read_sessions
from sekft.errors import ConfigError
from sekft.eval import EpisodeConfig, describe_scenarios, replay, run_episode
from sekft.sandbox import find_bwrap
from sekft.scenario import load_scenario, load_scenarios
from sekft.scenarios.factory import build, family_seeds, family_spec, generate, split_of
from sekft.scenarios.factory import instance as factory_instance
from sekft.scenarios.factory.__main__ import main as factory_main
from sekft.scenarios.factory.instance import build_instance
from sekft.scenarios.factory.provider import (
    PAST,
    REFUSALS,
    _man,
    commands,
    doc_commands,
    documentation,
    reply,
)
from sekft.scenarios.factory.spec import (
    BLOCKERS,
    DOCS,
    ENDING_SETS,
    GRAMMARS,
    HELDOUT_SHARE,
    NAMINGS,
    POSTS,
    REPLIES,
    WORKS,
    shares_no_spec_part,
)
from sekft.scenarios.factory.vocab import Vocab
from sekft.scenarios.factory.vocab import instance_vocab as factory_instance_vocab
from sekft.scenarios.record import main as record_main
from sekft.scenarios.record import record
from sekft.scenarios.words import WORDS
from sekft.scenarios.world import write_scenario

needs_bwrap = pytest.mark.skipif(find_bwrap() is None, reason="needs bubblewrap")
TRAIN = family_seeds("train", 300)
HELDOUT = family_seeds("heldout", 75)


def folder_bytes(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_mode, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def family_where(ending: str, **want) -> int:
    """The first family seed whose spec allows `ending` and has the fields in `want`."""
    return next(s for s in range(1000) if ending in family_spec(s).endings
                and all(getattr(family_spec(s), k) == v for k, v in want.items()))


def with_ending(seed: int, ending: str, instance_seed: int = 0):
    """Instance `instance_seed` of family `seed`, forced to `ending`."""
    return build_instance(replace(family_spec(seed), endings=(ending,)), instance_seed)


def call_index(spec, instance) -> int:
    """Where the expert's (last) call of the provider is: before its ending, or before the
    sibling it checks with."""
    siblings = {f"{spec.name} {c}" for c in (spec.lister, spec.status) if c}
    return len(instance.commands) - 2 - (instance.commands[-2] in siblings)


def play(instance, commands, tmp_path):
    scenario = load_scenario(write_scenario(instance, tmp_path))
    return run_episode(scenario, replay(commands), EpisodeConfig())


# Family specs


def test_family_spec_is_a_pure_function_of_its_seed():
    assert [family_spec(s) for s in range(50)] == [family_spec(s) for s in range(50)]


def test_dimensions_vary_independently_over_family_seeds():
    specs = [family_spec(s) for s in range(400)]
    assert {s.grammar for s in specs} == set(GRAMMARS)
    assert {s.docs for s in specs} == set(DOCS)
    assert {s.work for s in specs} == set(WORKS)
    assert {p for s in specs for p in s.posts} == set(POSTS)
    assert {s.endings for s in specs} == set(ENDING_SETS)
    assert {s.language for s in specs} == {"bash", "python"}
    assert {s.confirm is None for s in specs} == {True, False}
    assert {s.subcommand for s in specs} == {True, False}
    assert {s.naming for s in specs} == set(NAMINGS)
    assert {s.reply for s in specs} == set(REPLIES)
    assert {s.table for s in specs} == {True, False}
    # independent: each pair of grammar style and work kind is met
    assert len({(s.grammar, s.work) for s in specs}) == len(GRAMMARS) * len(WORKS)


def test_only_providers_with_subcommands_have_read_only_siblings():
    specs = [family_spec(s) for s in range(400)]
    with_sub = [s for s in specs if s.subcommand]
    assert all(s.lister is None and s.status is None for s in specs if not s.subcommand)
    assert 0.5 < sum(s.lister is not None for s in with_sub) / len(with_sub) < 0.9
    assert 0.2 < sum(s.status is not None for s in with_sub) / len(with_sub) < 0.6
    assert all(s.table for s in specs if s.lister or s.status)
    assert all(s.lister != s.verb for s in specs)
    with pytest.raises(ConfigError, match=f"family seed {with_sub[0].seed}: .*collide"):
        factory_instance.validate_spec(replace(with_sub[0], lister=with_sub[0].verb))
    plain = next(s for s in specs if not s.subcommand)
    with pytest.raises(ConfigError, match="without subcommands"):
        factory_instance.validate_spec(replace(plain, lister="list"))


def test_a_table_of_commands_shows_every_command_with_what_it_does():
    specs = [family_spec(s) for s in range(400)]
    tabled = [s for s in specs if s.table and s.status and s.lister]
    assert {s.layout for s in tabled} == {0, 1, 2}
    for spec in tabled:
        rows = commands(spec)
        assert [form.split()[:2] for form, _ in rows[1:]] == [
            [spec.name, spec.lister], [spec.name, spec.status]]
        text = documentation(spec)
        for form, what in rows:
            assert form in text and what in text, (spec.seed, form)
        if spec.layout == 0:  # the usage lines name every form, then the table
            assert text.splitlines()[1] == f"       {rows[1][0]}"
            assert f"  {rows[0][0]}  {rows[0][1]}" in text
        man = _man(spec)
        assert all(f".B {form}" in man for form, _ in rows)
    untabled = next(s for s in specs if not s.table and s.layout == 0)
    assert commands(untabled)[0][1] not in documentation(untabled)


def test_provider_names_are_distinct_over_families():
    names = Counter(family_spec(s).name for s in range(300))
    assert len(names) >= 290


def test_show_prints_every_dimension_of_a_family(capsys):
    assert factory_main(["--show", "3"]) == 0
    out = capsys.readouterr().out
    spec = family_spec(3)
    for text in (spec.name, spec.grammar, spec.docs, spec.work, spec.variant, spec.state,
                 spec.split, *spec.posts):
        assert text in out


# The split


def test_split_is_by_family_seed_and_about_one_in_five_held_out():
    share = sum(split_of(s) == "heldout" for s in range(2000)) / 2000
    assert abs(share - 1 / HELDOUT_SHARE) < 0.03
    assert all(family_spec(s).split == "train" for s in TRAIN)
    assert all(family_spec(s).split == "heldout" for s in HELDOUT)
    assert not set(TRAIN) & set(HELDOUT)


def test_heldout_families_share_no_spec_part_with_training_families():
    train, heldout = [family_spec(s) for s in TRAIN], [family_spec(s) for s in HELDOUT]
    for part in ("grammar", "docs", "work"):
        assert not {s.parts()[part] for s in train} & {s.parts()[part] for s in heldout}, part
    assert all(shares_no_spec_part(h, t) for h in heldout for t in train)


def test_training_meets_every_kind_that_heldout_families_use():
    train, heldout = [family_spec(s) for s in TRAIN], [family_spec(s) for s in HELDOUT]
    for kind in ("grammar", "docs", "work"):
        assert {getattr(s, kind) for s in heldout} <= {getattr(s, kind) for s in train}


def test_shares_no_spec_part_sees_one_shared_part():
    a = family_spec(HELDOUT[0])
    assert shares_no_spec_part(a, family_spec(TRAIN[0]))
    assert not shares_no_spec_part(a, replace(family_spec(TRAIN[0]), docs=a.docs,
                                              layout=a.layout))


def test_instances_take_the_split_of_their_family():
    assert {build(s, 0).split for s in TRAIN[:20]} == {"train"}
    assert {build(s, 0).split for s in HELDOUT[:5]} == {"heldout"}


# Instances


def test_same_seeds_write_byte_identical_scenario_folders(tmp_path):
    for family in range(12):
        for vocab in ("open", "closed"):
            a = generate(family, 4, tmp_path / f"a-{vocab}", vocab)
            b = generate(family, 4, tmp_path / f"b-{vocab}", vocab)
            assert folder_bytes(a) == folder_bytes(b)


def test_instance_seeds_vary_the_arguments_and_the_world():
    for family in range(10):
        instances = [build(family, seed) for seed in range(8)]
        assert len({i.key for i in instances}) >= 6
        assert len({tuple(sorted(i.files.items())) for i in instances}) == 8


def test_closed_vocabulary_arguments_are_closed_list_words_or_small_numbers():
    for family in range(40):
        key = build(family, 0, "closed").key
        for part in key[:-1]:
            for token in str(part).replace("/", " ").replace(".", " ").split():
                assert token in WORDS or token.isdigit() or token in (
                    "txt", "docs", "inbox", "shared", "work", "archive", "backup", "copy",
                    "move", "rename", "sort", "sed", "awk", "sort-u", "named", "address",
                    "lookup"), (family, key)


def test_open_vocabulary_invents_names_outside_the_closed_list():
    names = [str(part) for family in range(40) for part in build(family, 0, "open").key
             if isinstance(part, str)]
    assert sum(name in WORDS for name in names) < len(names) // 10


def test_every_expert_reads_the_directive_before_it_works():
    for family in range(60):
        instance = build(family, 0)
        assert instance.commands[0].split()[0] in ("ls", "cat")


def test_expert_reads_the_providers_own_documentation():
    for family in range(60):
        spec = family_spec(family)
        commands = build(family, 0).commands
        assert set(doc_commands(spec)) <= set(commands) or spec.docs == "usage"


def test_a_named_provider_is_called_by_its_name_or_as_a_thing():
    ways = Counter()
    for family in [s for s in TRAIN if family_spec(s).naming == "named"][:60]:
        name = family_spec(family).name
        for seed in range(2):
            text = b"\n".join(build(family, seed).files.values()).decode(errors="replace")
            ways["tool"] += f"the {name} tool" in text
            ways["thing"] += f"the {name}." in text or f"the {name} " in text.replace(
                f"the {name} tool", "")
            ways["name"] += f" {name}." in text or f" {name} " in text
    assert min(ways.values()) >= 10, ways


def test_an_unnamed_provider_is_found_on_the_path_before_it_is_used():
    unnamed = [s for s in range(80) if family_spec(s).naming == "unnamed"]
    named = [s for s in range(80) if family_spec(s).naming == "named"]
    assert len(unnamed) >= 20 and len(named) >= 20
    for family in unnamed:
        spec, instance = family_spec(family), build(family, 0)
        # nothing the directive's world holds names the tool (its own files aside)
        assert spec.name not in " ".join(
            body.decode(errors="replace") for path, body in instance.files.items()
            if not path.startswith(("local/", "share/")) and spec.name not in path), family
        first_use = next(i for i, c in enumerate(instance.commands) if spec.name in c)
        assert "ls /usr/local/bin" in instance.commands[:first_use], family
    for family in named:
        assert "ls /usr/local/bin" not in build(family, 0).commands


def test_written_scenario_carries_its_expert_in_meta(tmp_path):
    instance = build(5, 1)
    folder = write_scenario(instance, tmp_path)
    meta = json.loads((folder / "scenario.json").read_text())["meta"]
    assert meta["expert"] == list(instance.commands)


def test_impossible_spec_is_rejected_with_one_line_naming_the_seed():
    spec = replace(family_spec(7), layout=9)
    with pytest.raises(ConfigError) as e:
        build_instance(spec, 0)
    assert "family seed 7" in str(e.value) and "\n" not in str(e.value)


def test_directive_naming_a_missing_file_is_rejected_naming_both_seeds(monkeypatch):
    family = next(s for s in range(100) if family_spec(s).work == "record")
    real = factory_instance.BUILDERS["record"]
    monkeypatch.setitem(factory_instance.BUILDERS, "record",
                        lambda *a: replace(real(*a), files={}))
    with pytest.raises(ConfigError, match=rf"family seed {family}, instance seed 3: the "
                                          r"directive names data/\S+, which the world lacks"):
        build(family, 3)


def test_expert_ending_against_the_checker_is_rejected():
    family = family_where("success")
    spec = replace(family_spec(family), endings=("success",))
    instance = build_instance(spec, 0)
    job = replace(factory_instance.BUILDERS[spec.work](*_job_args(spec)), needs=())
    with pytest.raises(ConfigError, match=f"family seed {family}, instance seed 0: the expert "
                                          "ends with"):
        factory_instance.validate_instance(
            spec, replace(instance, commands=(*instance.commands[:-1], 'panic "x"')), job)


def _job_args(spec):
    rng = random.Random(0)
    return rng, Vocab("open", rng), spec.variant, spec.name


# The CLI, sekft-eval and the recorder


def test_factory_cli_writes_loadable_scenarios_of_the_split(tmp_path, capsys):
    code = factory_main(["--families", "3", "--seeds", "2", "--split", "heldout",
                         "--out", str(tmp_path)])
    scenarios = load_scenarios(tmp_path, split="heldout")
    assert code == 0
    assert len(scenarios) == 6
    assert {s.family for s in scenarios} == {family_spec(s).family for s in HELDOUT[:3]}
    assert "wrote 6 heldout scenarios of 3 factory families" in capsys.readouterr().err
    assert "heldout: " in describe_scenarios(scenarios)


def test_mixed_vocabulary_writes_open_and_closed_instances_alternately(tmp_path):
    assert factory_main(["--families", "2", "--seeds", "4", "--split", "train", "--vocab",
                         "mixed", "--out", str(tmp_path / "mixed")]) == 0
    for vocab in ("open", "closed"):
        assert factory_main(["--families", "2", "--seeds", "4", "--split", "train",
                             "--vocab", vocab, "--out", str(tmp_path / vocab)]) == 0
    for folder in sorted((tmp_path / "mixed").iterdir()):
        seed = int(folder.name.rsplit("-", 1)[1])
        same = tmp_path / ("open" if seed % 2 == 0 else "closed") / folder.name
        assert folder_bytes(folder) == folder_bytes(same), folder.name
    with pytest.raises(ConfigError, match="'some'"):
        factory_instance_vocab("some", 0)


def test_factory_cli_refuses_bad_input_in_one_line(tmp_path, capsys):
    assert factory_main(["--families", "0", "--seeds", "1", "--split", "train",
                         "--out", str(tmp_path)]) == 1
    assert factory_main(["--seeds", "1", "--split", "train", "--out", str(tmp_path)]) == 1
    assert factory_main(["--show", "-1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 3 and "Traceback" not in err


@needs_bwrap
def test_recorder_takes_factory_folders(tmp_path, capsys):
    factory_main(["--families", "2", "--seeds", "1", "--split", "train", "--vocab", "closed",
                  "--out", str(tmp_path / "scenarios")])
    out = tmp_path / "train.jsonl"
    code = record_main(["--split", "train", "--scenarios", str(tmp_path / "scenarios"),
                        "--out", str(out)])
    sessions = read_sessions(out)
    assert code == 0
    assert sorted(s.extra["family"] for s in sessions) == sorted(
        family_spec(s).family for s in TRAIN[:2])
    assert "wrote 2 train trajectories" in capsys.readouterr().err


def test_recorder_refuses_a_folder_without_an_expert(tmp_path, capsys):
    folder = write_scenario(build(1, 0), tmp_path / "s")
    data = json.loads((folder / "scenario.json").read_text())
    del data["meta"]["expert"]
    (folder / "scenario.json").write_text(json.dumps(data))
    code = record_main(["--split", data["split"], "--scenarios", str(tmp_path / "s"),
                        "--out", str(tmp_path / "x.jsonl")])
    assert code == 1
    assert "no 'expert'" in capsys.readouterr().err


# Experts and endings through the sandbox


def sweep(families, seeds, vocab="open", jobs=4):
    todo = [build(f, s, vocab) for f in families for s in seeds]
    records = record(todo, EpisodeConfig(), jobs=jobs)
    assert [r["ending"] for r in records] == [i.expect for i in todo]
    return todo


@needs_bwrap
def test_experts_pass_their_checkers_on_ten_families():
    todo = sweep([*range(8), *HELDOUT[:2]], range(3))
    assert {i.expect for i in todo} == {"exit", "panic"}
    assert {family_spec(int(i.family[2:].split("-")[0])).language for i in todo} == {
        "bash", "python"}


@needs_bwrap
def test_experts_pass_with_the_closed_vocabulary():
    sweep(range(10), range(1), vocab="closed")


@needs_bwrap
@pytest.mark.slow
def test_experts_pass_their_checkers_on_two_hundred_families():
    sweep(range(200), range(3))
    sweep(range(200), range(3), vocab="closed")


@needs_bwrap
@pytest.mark.parametrize("language", ["bash", "python"])
def test_exit_where_panic_is_due_fails(language, tmp_path):
    family = family_where("blocked", language=language)
    instance = with_ending(family, "blocked")
    episode = play(instance, [*instance.commands[:-1], "exit"], tmp_path)
    assert episode.ending == "exit" and episode.passed is False


@needs_bwrap
@pytest.mark.parametrize("ending", ["success", "recover"])
def test_panic_where_the_work_was_doable_fails(ending, tmp_path):
    instance = with_ending(family_where(ending), ending)
    episode = play(instance, [*instance.commands[:-1], 'panic "cannot do it"'], tmp_path)
    assert episode.ending == "panic" and episode.passed is False


@needs_bwrap
def test_panic_before_trying_the_blocked_tool_fails(tmp_path):
    spec = family_spec(family_where("blocked"))
    instance = with_ending(spec.seed, "blocked")
    before_call = list(instance.commands[:call_index(spec, instance)])
    episode = play(instance, [*before_call, instance.commands[-1]], tmp_path)
    assert episode.ending == "panic" and episode.passed is False


@needs_bwrap
@pytest.mark.parametrize("blocker", BLOCKERS)
def test_blocked_expert_panics_after_the_tool_refused_and_passes(blocker, tmp_path):
    spec = family_spec(family_where("blocked", blocker=blocker))
    instance = with_ending(spec.seed, "blocked")
    episode = play(instance, instance.commands, tmp_path)
    assert episode.ending == "panic" and episode.passed is True
    refusal = REFUSALS[blocker].format(name=spec.name)
    assert any(refusal in m["content"] for m in episode.messages if m["role"] == "user")


@needs_bwrap
def test_recover_expert_meets_an_error_then_passes(tmp_path):
    for confirm in (True, False):
        family = next(s for s in range(1000) if "recover" in family_spec(s).endings
                      and (family_spec(s).confirm is not None) == confirm)
        instance = with_ending(family, "recover")
        episode = play(instance, instance.commands, tmp_path / str(confirm))
        assert episode.passed is True
        assert any(status not in (0, None) for status in episode.statuses)


@needs_bwrap
def test_bash_and_python_providers_answer_alike(tmp_path):
    sibling = [s for s in range(400) if family_spec(s).lister and family_spec(s).status]
    replies = [next(s for s in range(400) if family_spec(s).reply == r) for r in REPLIES]
    for family in dict.fromkeys((0, 1, 2, 3, 6, *sibling[:3], *replies)):
        spec = family_spec(family)
        probes = [f"{spec.name} --help", f"{spec.name} -h", f"{spec.name} help", spec.name,
                  f"{spec.name} bogus --x", f"{spec.name} {spec.verb} a=b c"]
        siblings = [f"{spec.name} {c}" for c in (spec.lister, spec.status) if c]
        transcripts = []
        for language in ("bash", "python"):
            instance = build_instance(replace(spec, language=language, endings=("success",)),
                                      0)
            commands_ = [*siblings, *probes, *instance.commands[:-1], *siblings,
                         instance.commands[-1]]
            episode = play(instance, commands_, tmp_path / f"{family}-{language}")
            assert episode.passed is True
            transcripts.append(episode.messages)
        assert transcripts[0] == transcripts[1]
        if spec.lister:  # nothing before the call, the call's line after it
            outputs = [m["content"] for m in transcripts[0] if m["role"] == "user"]
            assert outputs.count("nothing recorded yet\nuser@sandbox:~$ ") == 1


@needs_bwrap
def test_a_call_that_works_replies_in_the_familys_way_and_the_lister_shows_it(tmp_path):
    for kind in REPLIES:
        family = next(s for s in range(400) if family_spec(s).reply == kind
                      and family_spec(s).lister and "success" in family_spec(s).endings
                      and family_spec(s).grammar != "stdin")
        spec = family_spec(family)
        instance = with_ending(family, "success")
        commands_ = [*instance.commands[:call_index(spec, instance) + 1],
                     f"{spec.name} {spec.lister}", "exit"]
        episode = play(instance, commands_, tmp_path / kind)
        assert episode.passed is True
        outputs = [m["content"].removesuffix("user@sandbox:~$ ")
                   for m in episode.messages if m["role"] == "user"]
        replied, listed = outputs[-2], outputs[-1]
        line = listed.strip()
        assert line and "nothing recorded" not in line
        said = {"done": f"{spec.name}: done: {line}\n", "past": f"{PAST[spec.verb]} {line}\n",
                "ok": "ok\n", "silent": ""}[kind]
        assert replied == said and reply(spec).replace("{line}", line) == said.strip(), kind


def test_some_experts_check_with_a_sibling_before_they_end():
    checked = Counter()
    for family in range(200):
        spec = family_spec(family)
        for seed in range(3):
            instance = build(family, seed)
            if instance.commands[-2] in (f"{spec.name} {spec.lister}",
                                         f"{spec.name} {spec.status}"):
                checked[instance.expect] += 1
                assert instance.commands[-2].split()[1] == (
                    spec.status if instance.expect == "panic" else spec.lister)
    assert checked["exit"] > 20 and checked["panic"] > 5


# Wrong-guess detours: a word of the directive tried as the unnamed tool, untrained


def test_wrong_guess_takes_a_standalone_word_of_the_directive_never_a_path_or_the_prompt():
    from sekft.scenarios.detour import wrong_guess

    directive = ("Hi,\n\nMove inbox/dulo.txt to archive/dulo.txt, then register "
                 "archive/dulo.txt with the usual tool.\nuser@sandbox:~$ ")
    guesses = {wrong_guess(directive, f"k-{n}") for n in range(100)}
    # "Move" is capitalised: a sentence's first word, not a name
    assert {g.replace("man ", "").replace(" --help", "") for g in guesses} == {
        "register", "usual", "tool"}
    assert any(g.startswith("man ") for g in guesses)
    assert any(g.endswith(" --help") for g in guesses)
    assert wrong_guess(directive, "k-3") == wrong_guess(directive, "k-3")
    assert wrong_guess("Copy docs/a.txt to x.\nuser@sandbox:~$ ", "k") is None


def test_wrong_guess_reads_a_mails_body_not_its_headers():
    from sekft.scenarios.detour import wrong_guess

    mail = ("From ship@poppy Mon Nov 23 08:00:00 2026\nSubject: A small job\n\n"
            "Hello,\n\nPublish reports/x.txt for goose.\nuser@sandbox:~$ ")
    words = {wrong_guess(mail, f"k-{n}").split()[-1] for n in range(50)}
    assert words <= {"publish", "goose", "--help"} and "goose" in " ".join(
        wrong_guess(mail, f"k-{n}") for n in range(50))


@needs_bwrap
def test_a_guess_detour_fails_in_the_sandbox_and_trains_only_the_experts_steps():
    from sekft.mask import IGNORE, encode_sessions
    from sekft.scenarios.detour import guess_step
    from sekft.scenarios.record import record_instance
    from sekft.template import ChatTemplate
    from sekft.tokenizer import load_tokenizer

    family = next(s for s in TRAIN if family_spec(s).naming == "unnamed")
    instance = build(family, 0)
    plain = record_instance(instance, EpisodeConfig())
    guessed = record_instance(instance, EpisodeConfig(), guess_from=plain["messages"])
    at = guess_step(list(instance.commands))
    assert guessed["guess"] == at and guessed["ending"] == plain["ending"]
    said = [m for m in guessed["messages"] if m["role"] == "assistant"]
    assert [m.get("weight", 1) for m in said].count(0) == 1 and said[at]["weight"] == 0
    assert said[at + 1]["content"] == "ls /usr/local/bin"
    m = guessed["messages"]
    failed = m[2 * at + 2]["content"]
    assert "command not found" in failed or "No manual entry" in failed
    assert m[:2 * at + 1] + m[2 * at + 3:] == plain["messages"]  # the guess pair taken out
    folder = Path(__file__).parent / "fixtures" / "templates" / "smollm2"
    template, tokenizer = ChatTemplate.from_folder(folder), load_tokenizer(folder)
    encoded, reference = encode_sessions([m, plain["messages"]], template, tokenizer)
    assert encoded.violations == []
    assert ([t for t in encoded.labels if t != IGNORE]
            == [t for t in reference.labels if t != IGNORE])


def record_cli_detours(tmp_path, capsys, option: str, key: str, seeds: tuple[int, int],
                       bad: str) -> tuple[int, list[str], str, int, str]:
    """Record instance 0 of two families through the CLI with `option` 1: (sessions
    written, families of the records carrying `key`, stderr); then with `option` `bad`:
    (exit code, stderr)."""
    folder = tmp_path / "scenarios"
    for seed in seeds:
        write_scenario(build(seed, 0), folder)
    out = tmp_path / "d.jsonl"
    argv = ["--split", "train", "--scenarios", str(folder), "--out", str(out), option]
    assert record_main([*argv, "1"]) == 0
    sessions = read_sessions(out)
    detoured = [s.extra["family"] for s in sessions if key in s.extra]
    err = capsys.readouterr().err
    code = record_main([*argv, bad])
    return len(sessions), detoured, err, code, capsys.readouterr().err


@needs_bwrap
def test_record_cli_guesses_only_where_the_expert_looks_for_the_tool(tmp_path, capsys):
    unnamed = next(s for s in TRAIN if family_spec(s).naming == "unnamed")
    named = next(s for s in TRAIN if family_spec(s).naming == "named")
    n, guesses, err, code, bad_err = record_cli_detours(
        tmp_path, capsys, "--guesses", "guess", (unnamed, named), "-0.5")
    assert n == 3 and guesses == [build(unnamed, 0).family]
    assert "1 wrong guesses" in err
    assert code == 1
    assert "--guesses must be a share from 0 to 1, got -0.5" in bad_err


# Wrong-help detours: another way of asking the tool for help, refused, untrained


def test_wrong_help_asks_the_same_tool_another_way():
    from sekft.scenarios.detour import help_step, help_tool, wrong_help

    assert [help_tool(c) for c in ("zo --help", "zo -h", "zo help", "man zo", "zo",
                                   "zo --help | head", "cat zo", "zo list")] == [
        "zo", "zo", "zo", "zo", None, None, None, None]
    forms = {wrong_help("zo --help", f"k-{n}") for n in range(60)}
    assert forms == {"zo -h", "zo help", "man zo"}
    assert wrong_help("man zo", "k-1") == wrong_help("man zo", "k-1")
    assert help_step(["cat orders", "ls /usr/local/bin", "zo help", "zo add a", "exit"]) == 2
    assert help_step(["cat orders", "zo", "exit"]) is None
    with pytest.raises(ValueError, match="does not ask"):
        wrong_help("zo list", "k")


@needs_bwrap
def test_a_wrong_help_detour_is_refused_and_trains_only_the_experts_steps():
    from sekft.scenarios.detour import help_step
    from sekft.scenarios.record import record_instance

    family = next(s for s in TRAIN if family_spec(s).docs in ("help", "h", "helpcmd", "man"))
    spec = family_spec(family)
    instance = build(family, 0)
    plain = record_instance(instance, EpisodeConfig())
    detoured = record_instance(instance, EpisodeConfig(), ask_wrong=True)
    at = help_step(list(instance.commands))
    assert detoured["wrong_help"] == at and detoured["ending"] == plain["ending"]
    said = [m for m in detoured["messages"] if m["role"] == "assistant"]
    assert [m.get("weight", 1) for m in said].count(0) == 1 and said[at]["weight"] == 0
    assert said[at]["content"] != said[at + 1]["content"] == instance.commands[at]
    refused = detoured["messages"][2 * at + 2]["content"]
    assert "No manual entry" in refused or spec.name in refused  # the tool's own refusal
    m = detoured["messages"]
    assert m[:2 * at + 1] + m[2 * at + 3:] == plain["messages"]


@needs_bwrap
def test_record_cli_asks_wrong_only_where_the_expert_asks_for_help(tmp_path, capsys):
    asks = next(s for s in TRAIN if family_spec(s).docs == "help")
    never = next(s for s in TRAIN if family_spec(s).docs == "usage")  # runs the tool bare
    n, detoured, err, code, bad_err = record_cli_detours(
        tmp_path, capsys, "--wrong-help", "wrong_help", (asks, never), "2")
    assert n == 3 and detoured == [build(asks, 0).family]
    assert "1 wrong help requests" in err
    assert code == 1
    assert "--wrong-help must be a share from 0 to 1, got 2" in bad_err

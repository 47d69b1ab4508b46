"""The evaluator with scripted policies standing in for the model, on the fixture scenarios."""

import io
import json
import re
import shutil
from pathlib import Path

import pytest

from sekft.eval import (
    ContextExhausted,
    Episode,
    EpisodeConfig,
    Reply,
    SuiteProgress,
    describe_scenarios,
    is_command,
    main,
    replay,
    report,
    run_episode,
    run_suite,
    stalled,
    summarize,
    table,
    wilson,
    write_outputs,
)
from sekft.progress import ProgressLine
from sekft.sandbox import find_bwrap
from sekft.scenario import load_scenario, load_scenarios
from sekft.shell import first_word

FIXTURES = Path(__file__).parent / "fixtures" / "scenarios"
needs_bwrap = pytest.mark.skipif(find_bwrap() is None, reason="needs bubblewrap")
# Generous grace: a loaded machine can take a while to answer Ctrl-C; only a command that
# ignores it waits the whole grace.
FAST = EpisodeConfig(kill_grace=3.0)


def scenario(name, tmp_path=None, **changes):
    """A fixture scenario, copied and edited when `changes` are given."""
    if not changes:
        return load_scenario(FIXTURES / name)
    folder = shutil.copytree(FIXTURES / name, tmp_path / name)
    data = json.loads((folder / "scenario.json").read_text())
    data.update(changes)
    (folder / "scenario.json").write_text(json.dumps(data))
    return load_scenario(folder)


@pytest.mark.parametrize(("k", "n", "low", "high"), [
    (0, 10, 0.0, 0.2775), (5, 10, 0.2366, 0.7634), (10, 10, 0.7225, 1.0), (1, 20, 0.0089, 0.2361),
])
def test_wilson_interval_matches_hand_computed_values(k, n, low, high):
    assert wilson(k, n) == pytest.approx((low, high), abs=5e-5)


def test_eval_names_splits_and_families_of_what_it_runs():
    scenarios = load_scenarios(FIXTURES)
    lines = describe_scenarios(scenarios).splitlines()
    assert lines[0] == f"{len(scenarios)} scenarios:"
    for s in scenarios:
        assert any(line.startswith(f"  {s.split}: ") and f"{s.family} (" in line
                   for line in lines[1:])
    assert len(lines) == 1 + len({s.split for s in scenarios})  # no suite split: not ours


def test_eval_prints_the_builtin_suites_split_for_its_scenarios(tmp_path):
    from sekft.scenarios import describe_split, generate

    generate("ticket", 0, tmp_path / "t")
    text = describe_scenarios(load_scenarios(tmp_path))
    assert "heldout: ticket (1)" in text
    assert text.endswith(describe_split())


def test_wilson_interval_of_nothing_is_everything():
    assert wilson(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize(("command", "word"), [
    ("ls -la", "ls"), ("FOO=1 BAR=2 env", "env"), ("! grep x f", "grep"),
    ("(cd /tmp; ls)", "("), ("cd /tmp && ls", "cd"), ("# just a comment", None), ("", None),
])
def test_first_word_is_what_bash_runs_first(command, word):
    assert first_word(command) == word


@pytest.mark.parametrize(("reply", "expected"), [
    ("ls -la", True),
    ("```bash\nls\n```", False),
    ("I will list the files first.", False),
    ("echo )", False),
    ("for f in *; do echo $f; done", True),
])
def test_command_mode_needs_parse_no_fence_and_runnable_first_word(reply, expected):
    runnable = {"ls", "echo", "for"}.__contains__
    assert is_command(reply, runnable) is expected


def test_replay_policy_gives_commands_in_order_then_exit():
    policy = replay(["a", "b"])
    assert policy([{"role": "user", "content": "x"}]) == "a"
    history = [{"role": "user"}, {"role": "assistant"}, {"role": "user"}] * 2
    assert policy(history) == "exit"


@needs_bwrap
def test_correct_script_passes_and_first_message_is_only_banner_and_prompt():
    s = scenario("write-done")
    episode = run_episode(s, replay(["cat TODO", "echo ok > done", "exit"]), FAST)
    assert episode.messages[0] == {
        "role": "user", "content": "Welcome to sandbox. You have mail.\nuser@sandbox:~$ "}
    assert episode.messages[2]["content"] == (
        "Write the word ok into ~/done, then exit.\nuser@sandbox:~$ ")
    assert (episode.ending, episode.passed, episode.turns) == ("exit", True, 3)
    assert episode.command_mode == [True, True, True]
    assert episode.messages[-1] == {"role": "assistant", "content": "exit"}


@needs_bwrap
def test_wrong_script_fails_the_checker():
    episode = run_episode(scenario("write-done"), replay(["echo nope > done", "exit"]), FAST)
    assert episode.ending == "exit" and episode.passed is False


@needs_bwrap
def test_panic_ends_the_episode_with_its_reason_and_check_sees_it():
    policy = replay(["deploy", "panic 'the deploy key is missing'"])
    episode = run_episode(scenario("blocked-key"), policy, FAST)
    assert (episode.ending, episode.panic_reason) == ("panic", "the deploy key is missing")
    assert episode.passed is True
    assert "missing key" in episode.messages[2]["content"]


@needs_bwrap
def test_exit_on_a_scenario_that_expects_panic_fails():
    episode = run_episode(scenario("blocked-key"), replay(["deploy", "exit"]), FAST)
    assert episode.ending == "exit" and episode.passed is False


@needs_bwrap
def test_turn_budget_runs_out():
    episode = run_episode(scenario("write-done"), replay(["ls"] * 10), FAST)
    assert (episode.ending, episode.turns) == ("budget", 6)
    assert episode.messages[-1]["role"] == "user"


def test_stalled_after_k_replies_that_are_not_commands():
    replies = ["ls", "I am sorry", "Hello!", "How can I help?"]
    assert stalled(replies, [True, False, False, False], 3)
    assert not stalled(replies, [True, False, False, False], 4)  # the first was a command


def test_stalled_after_one_line_repeated_k_times():
    replies = ["cat notes", "man ledger", "man ledger", "man ledger"]
    assert stalled(replies, [True] * 4, 3)
    assert not stalled(replies[:-1] + ["ledger --help"], [True] * 4, 3)


def test_stalled_is_off_at_zero_and_waits_for_k_replies():
    assert not stalled(["hi", "hi", "hi"], [False] * 3, 0)
    assert not stalled(["hi", "hi"], [False] * 2, 3)


@needs_bwrap
def test_stall_turns_ends_a_looping_episode_before_its_budget():
    config = EpisodeConfig(kill_grace=3.0, stall_turns=3)
    episode = run_episode(scenario("write-done"), replay(["ls"] * 10), config)
    assert (episode.ending, episode.turns, episode.passed) == ("stalled", 3, False)
    assert episode.messages[-1]["role"] == "user"  # the third reply ran before the stop


@needs_bwrap
def test_stall_turns_ends_an_episode_of_prose():
    config = EpisodeConfig(kill_grace=3.0, stall_turns=2)
    episode = run_episode(scenario("write-done"),
                          replay(["ls", "Sure, here you go", "I cannot do that."]), config)
    assert (episode.ending, episode.turns) == ("stalled", 3)
    assert episode.command_mode == [True, False, False]


@needs_bwrap
def test_episode_wall_clock_runs_out():
    config = EpisodeConfig(kill_grace=3.0, episode_timeout=0.0)
    episode = run_episode(scenario("write-done"), replay(["ls"]), config)
    assert (episode.ending, episode.turns) == ("timeout", 0)


@needs_bwrap
def test_episode_timeout_interrupts_a_hung_command_whatever_the_scenario_allows(tmp_path):
    s = scenario("write-done", tmp_path, command_timeout=30)
    config = EpisodeConfig(kill_grace=3.0, episode_timeout=1.0)
    episode = run_episode(s, replay(["cat", "echo ok > done"]), config)
    assert (episode.ending, episode.turns, episode.timeouts) == ("timeout", 1, 1)
    assert "sent Ctrl-C" in episode.messages[2]["content"]
    # Ctrl-C came within the episode's limit plus the grace, not after the scenario's.
    assert episode.seconds < 1.0 + config.kill_grace + 10


@needs_bwrap
def test_context_exhaustion_ends_the_episode():
    def policy(messages):
        if len(messages) > 2:
            raise ContextExhausted
        return Reply("ls", tokens=3)

    episode = run_episode(scenario("write-done"), policy, FAST)
    assert (episode.ending, episode.turns, episode.tokens) == ("context", 1, 3)


@needs_bwrap
@pytest.mark.parametrize("command", ["sleep 1000", "cat", "yes"])
def test_command_that_never_returns_is_cut_off_and_the_episode_continues(tmp_path, command):
    s = scenario("write-done", tmp_path, command_timeout=0.5)
    episode = run_episode(s, replay([command, "echo ok > done", "exit"]), FAST)
    assert "sent Ctrl-C" in episode.messages[2]["content"]
    assert (episode.timeouts, episode.passed, episode.turns) == (1, True, 3)


@needs_bwrap
def test_a_fenced_reply_is_not_a_command_and_the_episode_goes_on_in_step(tmp_path):
    s = scenario("write-done", tmp_path, command_timeout=1)
    fenced = "```bash\ncat TODO\n```"
    episode = run_episode(s, replay([fenced, "cat TODO", "echo ok > done", "exit"]), FAST)
    assert episode.command_mode == [False, True, True, True]
    assert "Write the word ok" in episode.messages[4]["content"]
    assert (episode.ending, episode.passed, episode.turns) == ("exit", True, 4)


@needs_bwrap
def test_huge_output_is_capped_in_the_observation():
    config = EpisodeConfig(kill_grace=3.0, max_output_bytes=1000)
    episode = run_episode(scenario("write-done"), replay(["seq 1 100000", "exit"]), config)
    observation = episode.messages[2]["content"]
    assert "bytes omitted" in observation and len(observation.encode()) < 1200
    assert observation.startswith("1\n2\n") and observation.endswith("100000\nuser@sandbox:~$ ")


@needs_bwrap
def test_failing_setup_is_a_scenario_error_not_a_model_failure(tmp_path):
    s = scenario("write-done", tmp_path, id="broken-setup")
    (s.path / "setup.sh").write_text("echo cannot build the world >&2\nexit 3\n")
    good = scenario("blocked-key")
    episodes = run_suite([s, good], lambda sc: replay(["panic 'x'"]), FAST)
    assert "exited 3" in episodes[0].error and "cannot build the world" in episodes[0].error
    summary = summarize(episodes)
    assert (summary["episodes"], summary["scenario_errors"]) == (1, 1)
    assert summary["checker_pass"]["k"] == 1


@needs_bwrap
def test_check_hung_by_the_models_doing_is_a_failed_episode_not_a_scenario_error(tmp_path):
    s = scenario("write-done", tmp_path, id="fifo-done")
    # The model leaves a fifo where the check reads a file: the check hangs on it.
    (s.path / "check.sh").write_text('grep -qx ok "$HOME/done"\n')
    config = EpisodeConfig(kill_grace=3.0, check_timeout=1.0)
    episodes = run_suite([s], lambda sc: replay(["rm -f done; mkfifo done", "exit"]), config)
    assert episodes[0].error is None and episodes[0].passed is False
    assert "still running after 1s" in episodes[0].check_output
    summary = summarize(episodes)
    assert (summary["episodes"], summary["scenario_errors"]) == (1, 0)


@needs_bwrap
def test_a_check_that_hangs_before_the_model_acted_is_still_a_scenario_error(tmp_path):
    s = scenario("write-done", tmp_path, id="hung-check")
    (s.path / "check.sh").write_text("sleep 100\n")
    config = EpisodeConfig(kill_grace=3.0, check_timeout=0.5, episode_timeout=0.0)
    episode = run_suite([s], lambda sc: replay([]), config)[0]
    assert episode.error is not None and "still running" in episode.error


def _episodes():
    scripts = {"write-done": ["cat TODO", "echo ok > done", "exit"],
               "blocked-key": ["I should deploy", "panic 'no key'"]}
    return run_suite(load_scenarios(FIXTURES), lambda s: replay(scripts[s.id]), FAST, jobs=2)


@needs_bwrap
def test_rates_overall_and_per_family():
    rep = report(_episodes())
    overall = rep["overall"]
    assert overall["checker_pass"]["k"] == 2 and overall["checker_pass"]["n"] == 2
    assert overall["command_mode_first"]["k"] == 1
    assert (overall["command_mode_replies"]["k"], overall["command_mode_replies"]["n"]) == (4, 5)
    assert overall["correct_panic"]["k"] == overall["correct_panic"]["n"] == 1
    assert overall["endings"]["exit"]["k"] == overall["endings"]["panic"]["k"] == 1
    assert set(rep["families"]) == {"blocked", "notes"}
    assert "blocked" in table({"model": rep})


@needs_bwrap
def test_outputs_results_transcripts_and_a_self_contained_report(tmp_path, tiny_llama):
    from sekft.mask import main as mask_main

    episodes = _episodes()
    write_outputs(tmp_path, episodes, {"note": "test"})
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["runs"]["model"]["overall"]["checker_pass"]["k"] == 2
    lines = (tmp_path / "transcripts.jsonl").read_text().splitlines()
    assert [json.loads(line)["scenario"] for line in lines] == ["blocked-key", "write-done"]
    page = (tmp_path / "report.html").read_text()
    assert "no key" in page and "Write the word ok" in page and "src=" not in page
    assert mask_main(["--inspect", "--data", str(tmp_path / "transcripts.jsonl"),
                      "--base", str(tiny_llama)]) == 0


def without_eta(lines: list[str]) -> list[str]:
    """Progress lines with their ETA checked for form and cut off (timings vary)."""
    pattern = re.compile(r"(.*)  ETA (\?|\d+s|\d+m\d\ds|\d+h\d\dm)")
    return [pattern.fullmatch(line).group(1) for line in lines]


def test_suite_progress_counts_passes_per_run_and_scenario_errors_apart():
    out = io.StringIO()
    progress = SuiteProgress(4, ProgressLine(out))
    progress.show()
    for run, passed, error in [("adapter", True, None), ("adapter", None, "setup.sh exited 3"),
                               ("base", False, None), ("base", True, None)]:
        progress.episode_done(Episode("s", "f", "heldout", "exit", run, passed=passed,
                                      error=error))
    progress.close()
    assert without_eta(out.getvalue().splitlines()) == [
        "episode 0/4",
        "episode 1/4  adapter pass 1/1",
        "episode 2/4  adapter pass 1/1  1 scenario error",
        "episode 3/4  adapter pass 1/1  base pass 0/1  1 scenario error",
        "episode 4/4  adapter pass 1/1  base pass 1/2  1 scenario error",
    ]
    assert out.getvalue().splitlines()[0].endswith("ETA ?")
    assert out.getvalue().splitlines()[-1].endswith("ETA 0s")


@needs_bwrap
def test_cli_shows_a_progress_line_as_episodes_end(tmp_path, capsys, monkeypatch):
    from sekft import generate

    # The same scripted policy for both runs: it passes write-done and fails blocked-key,
    # which expects a panic.
    policy = replay(["cat TODO", "echo ok > done", "exit"])
    monkeypatch.setattr(generate, "policies_from_args",
                        lambda args: {"adapter": policy, "base": policy})
    assert main(["--base", "x", "--scenarios", str(FIXTURES), "--split", "all",
                 "--out", str(tmp_path)]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines()
             if line.startswith("episode ")]
    assert without_eta(lines) == [
        "episode 0/4",
        "episode 1/4  adapter pass 0/1",
        "episode 2/4  adapter pass 1/2",
        "episode 3/4  adapter pass 1/2  base pass 0/1",
        "episode 4/4  adapter pass 1/2  base pass 1/2",
    ]


def test_cli_rejects_a_missing_scenarios_folder_in_one_line(tmp_path, capsys):
    code = main(["--base", "x", "--scenarios", str(tmp_path / "nope"), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "scenarios folder does not exist" in err


def test_cli_rejects_negative_stall_turns_in_one_line(tmp_path, capsys):
    code = main(["--base", "x", "--scenarios", str(FIXTURES), "--split", "all",
                 "--stall-turns", "-1", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "--stall-turns -1" in err


def test_cli_needs_a_model_name_with_an_endpoint(tmp_path, capsys):
    code = main(["--endpoint", "http://127.0.0.1:1", "--scenarios", str(FIXTURES),
                 "--out", str(tmp_path)])
    assert code == 1 and "--endpoint needs --model" in capsys.readouterr().err


@needs_bwrap
def test_full_prefills_a_policy_reports_are_counted_in_the_results():
    from sekft.eval import Reply

    answers = iter([Reply("cat TODO"), Reply("echo ok > done", full_prefill=True),
                    Reply("exit", full_prefill=True)])
    episode = run_episode(scenario("write-done"), lambda messages: next(answers), FAST)
    assert episode.full_prefills == 2
    assert summarize([episode, episode])["full_prefills"] == 4

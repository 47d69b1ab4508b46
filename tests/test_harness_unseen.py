"""The eval harness against replies no expert types: what a fine-tuned small model may write.

Each test drives a hand-made scenario (or a bare shell) with scripted replies and checks the
ending, the observation the model sees next, and that nothing is left behind. Short
timeouts throughout; the sandboxed tests skip without bubblewrap.
"""

import json
import os
from pathlib import Path

import pytest

from sekft.eval import EpisodeConfig, is_command, replay, run_episode, utf8_text
from sekft.sandbox import PANIC_FILE, Sandbox, find_bwrap
from sekft.scenario import load_scenario
from sekft.shell import Shell, blank, syntax_error

needs_bwrap = pytest.mark.skipif(find_bwrap() is None, reason="needs bubblewrap")
# Generous grace (a loaded machine can be slow to answer Ctrl-C); short everything else.
QUICK = EpisodeConfig(kill_grace=3.0, episode_timeout=30, setup_timeout=20, check_timeout=20)
PROMPT = "user@sandbox:~$ "


def hand_scenario(folder: Path, command_timeout: float = 1, turn_budget: int = 8) -> Path:
    """~/TODO asks for ~/done holding 'ok'; check.sh also prints how the episode ended."""
    folder.mkdir(parents=True)
    (folder / "scenario.json").write_text(json.dumps({
        "id": folder.name, "family": "hand", "split": "heldout", "expect": "exit",
        "turn_budget": turn_budget, "command_timeout": command_timeout,
        "description": "hand-made"}))
    (folder / "setup.sh").write_text('echo "write ok to ~/done" > "$HOME/TODO"\n')
    (folder / "check.sh").write_text('echo "ending=$SEKFT_ENDING reason=$SEKFT_PANIC_REASON"\n'
                                     '[ "$(cat "$HOME/done")" = ok ]\n')
    return folder


def play(tmp_path, replies, config=QUICK, **scenario):
    return run_episode(load_scenario(hand_scenario(tmp_path / "s", **scenario)),
                       replay(replies), config)


def shown(episode, reply_index: int) -> str:
    """The observation that followed the `reply_index`-th reply (0-based)."""
    return episode.messages[2 * reply_index + 2]["content"]


@pytest.fixture
def shell():
    with Sandbox.create() as box, Shell(box, kill_grace=3.0) as sh:
        yield sh


# ---- what counts as a command line ---------------------------------------------------------


@pytest.mark.parametrize(("command", "expected"), [
    ("", True), ("  \t\n\n", True), ("# thinking", True), ("  # a\n\n# b", True),
    ("x=5", False), ("PS1='$ '", False), ("# note\nls", False), ("ls # note", False),
])
def test_blank_means_nothing_to_run_not_no_first_word(command, expected):
    assert blank(command) is expected


def test_a_line_of_only_assignments_is_a_command_and_parses():
    runnable = {"ls"}.__contains__
    assert syntax_error("DIR=/tmp/x") is None
    assert is_command("DIR=/tmp/x", runnable) and is_command("A=1 B=2", runnable)
    assert not is_command("# A=1", runnable) and not is_command("", runnable)


def test_a_lone_surrogate_from_an_endpoint_becomes_a_replacement_character():
    assert utf8_text("echo \ud83d hi") == "echo \ufffd hi"
    assert utf8_text("echo 😀 ok") == "echo 😀 ok"


# ---- the panic record is hostile ------------------------------------------------------------


def test_a_folder_or_nul_where_panic_records_never_raises():
    with Sandbox.create(sandbox=False) as box:
        record = box.world.parent / "record" / PANIC_FILE
        (record / "deep").mkdir(parents=True)
        assert box.take_panic() is None and not record.exists()
        record.write_bytes(b"no\0 key\n")
        assert box.take_panic() == "no key"


@needs_bwrap
def test_a_panic_record_holding_a_nul_ends_in_panic_and_check_runs(tmp_path):
    episode = play(tmp_path, ["printf 'a\\0b' > /opt/sekft/record/panic"])
    assert (episode.ending, episode.panic_reason) == ("panic", "ab")
    assert "ending=panic reason=ab" in episode.check_output


@needs_bwrap
def test_a_folder_made_where_panic_records_does_not_stop_the_episode(tmp_path):
    episode = play(tmp_path, ["mkdir -p /opt/sekft/record/panic/x", "ls", "panic 'no way'"])
    assert shown(episode, 1) == "TODO\n" + PROMPT
    assert (episode.ending, episode.panic_reason) == ("panic", "no way")


# ---- replies the terminal would misread ---------------------------------------------------


@needs_bwrap
def test_assignments_run_and_persist(tmp_path):
    episode = play(tmp_path, ["DIR=/tmp/w", "mkdir -p $DIR && echo [$DIR]",
                              "GREETING=ok; export GREETING", "echo $GREETING > ~/done"])
    assert shown(episode, 1) == "[/tmp/w]\n" + PROMPT
    assert episode.command_mode[:4] == [True, True, True, True]
    assert (episode.ending, episode.passed) == ("exit", True)


@pytest.mark.parametrize("key", ["\x03", "\x04", "\x15", "\x17", "\x7f", "\x13", "\x1a",
                                 "\x1c", "\x00"])
@needs_bwrap
def test_a_control_character_in_a_reply_reaches_bash_as_a_byte_not_a_key(shell, key):
    result = shell.run(f"echo a{key}b; echo next", timeout=3)
    assert not result.timed_out and not result.ended
    assert result.output.replace(key.encode(), b"") == b"ab\r\nnext\r\n"
    assert shell.run("echo fine", timeout=3).output == b"fine\r\n"


@needs_bwrap
def test_a_reply_that_is_only_ctrl_d_does_not_end_the_session(shell):
    result = shell.run("\x04", timeout=3)
    assert not result.ended and not result.timed_out and result.status == 127
    assert shell.run("echo alive", timeout=3).output == b"alive\r\n"


@needs_bwrap
def test_carriage_returns_are_enter_keys(shell):
    assert shell.run("echo hi\r\necho there\r\n", timeout=3).output == b"hi\r\nthere\r\n"


# ---- the model changes the terminal or the shell's options ---------------------------------


@needs_bwrap
def test_stty_cannot_show_or_rewrite_what_the_harness_types(shell):
    shell.run("stty echo", timeout=3)
    assert shell.run("echo hi", timeout=3).output == b"hi\r\n"
    shell.run("stty erase a kill b werase c", timeout=3)
    assert shell.run("echo abc", timeout=3).output == b"abc\r\n"
    shell.run("stty inlcr", timeout=3)
    result = shell.run("pwd", timeout=3)
    assert (result.output, result.timed_out) == (b"/home/user\r\n", False)


@needs_bwrap
def test_ctrl_c_still_interrupts_after_the_model_turned_it_off(shell):
    shell.run("stty -isig intr ^X", timeout=3)
    result = shell.run("sleep 100", timeout=0.5)
    assert result.timed_out and not result.restarted and result.status == 130
    assert shell.run("echo next", timeout=3).output == b"next\r\n"


@needs_bwrap
def test_set_x_traces_the_models_commands_not_the_harness(shell):
    shell.run("set -x", timeout=3)
    assert shell.run("echo hi", timeout=3).output == b"+ echo hi\r\nhi\r\n"
    result = shell.run("false", timeout=3)
    assert (result.output, result.status) == (b"+ false\r\n", 1)
    assert shell.run("cd /tmp", timeout=3).output == b"+ cd /tmp\r\n"
    assert shell.prompt() == "user@sandbox:/tmp$ "


# ---- who ended the session ----------------------------------------------------------------


@needs_bwrap
def test_a_shell_ended_by_the_harness_ctrl_c_is_restarted_not_an_exit(tmp_path):
    episode = play(tmp_path, ["cd /tmp && exec sleep 100", "pwd", "echo ok > ~/done"])
    assert (episode.timeouts, episode.restarts, episode.statuses[0]) == (1, 1, None)
    assert "a new one started in ~" in shown(episode, 0)
    assert shown(episode, 1) == "/home/user\n" + PROMPT
    assert (episode.ending, episode.passed, episode.turns) == ("exit", True, 4)


@needs_bwrap
def test_exec_of_a_hang_at_the_episode_limit_is_a_timeout(tmp_path):
    config = EpisodeConfig(kill_grace=3.0, episode_timeout=1.0)
    episode = play(tmp_path, ["exec cat"], config=config, command_timeout=5)
    assert episode.ending == "timeout" and "ending=timeout" in episode.check_output


@pytest.mark.parametrize(("reply", "status"), [
    ("exit 3", 3), ("kill -9 $$", 137), ("set -e; false", 1), ("sleep 100 & exit", 0),
])
@needs_bwrap
def test_the_models_own_way_out_of_the_shell_is_an_exit(tmp_path, reply, status):
    episode = play(tmp_path, [reply])
    assert (episode.ending, episode.turns, episode.statuses) == ("exit", 1, [status])
    assert episode.seconds < 15


@needs_bwrap
def test_exit_that_does_not_end_the_shell_is_not_an_ending(tmp_path):
    episode = play(tmp_path, ["( exit )", "alias exit=true", "exit", "echo ok > ~/done"],
                   turn_budget=4)
    assert (episode.ending, episode.passed) == ("budget", True)


@needs_bwrap
def test_a_lone_surrogate_in_a_reply_runs_and_is_transcribed(tmp_path):
    episode = play(tmp_path, ["echo \ud83d ok", "echo ok > ~/done"])
    assert episode.messages[1]["content"] == "echo \ufffd ok"
    assert shown(episode, 0) == "\ufffd ok\n" + PROMPT
    assert (episode.ending, episode.passed) == ("exit", True)


# ---- nothing left behind ------------------------------------------------------------------


def _host_processes_running(marker: str) -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker.encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return [p for p in pids if p != os.getpid()]


@needs_bwrap
def test_the_next_episode_starts_clean_and_no_process_outlives_its_episode(tmp_path):
    first = play(tmp_path / "a", ["setsid nohup sleep 4242.5 >/dev/null 2>&1 &",
                                  "echo left > /tmp/marker; DIR=x; set -x; stty echo",
                                  "mkdir /opt/sekft/record/panic"])
    assert first.ending == "exit"
    assert _host_processes_running("4242.5") == []
    second = play(tmp_path / "b", ["ls -A /tmp; echo [$DIR]; ps -e | grep -c sleep"])
    assert shown(second, 0) == "[]\n0\n" + PROMPT

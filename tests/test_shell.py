"""The persistent sandboxed bash: one behaviour per test, short timeouts throughout."""

import signal
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sekft.observation import cap, clean, login, observe, overwrite
from sekft.sandbox import Limits, Sandbox, find_bwrap
from sekft.shell import CommandResult, Shell, syntax_error

pytestmark = pytest.mark.skipif(find_bwrap() is None, reason="needs bubblewrap")


@pytest.fixture
def shell():
    # Generous grace: a loaded machine can take a while to answer Ctrl-C; only a command
    # that ignores it waits the whole grace (and that test uses its own shell).
    with Sandbox.create() as box, Shell(box, kill_grace=3.0) as sh:
        yield sh


def test_output_and_exit_status_of_each_command(shell):
    ok = shell.run("echo hello", timeout=5)
    failed = shell.run("ls /nonexistent", timeout=5)
    assert (ok.output, ok.status) == (b"hello\r\n", 0)
    assert failed.status == 2 and b"No such file" in failed.output


def test_directory_and_variables_persist_between_commands(shell):
    shell.run("cd /tmp && export GREETING=hi", timeout=5)
    assert shell.run("echo $GREETING; pwd", timeout=5).output == b"hi\r\n/tmp\r\n"
    assert shell.prompt() == "user@sandbox:/tmp$ "


def test_prompt_starts_at_home_as_tilde(shell):
    assert shell.prompt() == "user@sandbox:~$ "


def test_typed_command_is_not_echoed(shell):
    assert b"printf" not in shell.run("printf 'x%s' y", timeout=5).output


def test_terminal_is_dumb_with_cat_pagers(shell):
    result = shell.run("echo $TERM $PAGER $MANPAGER $GIT_PAGER", timeout=5)
    assert result.output == b"dumb cat cat cat\r\n"


def test_long_lines_do_not_wrap(shell):
    result = shell.run("printf 'a%.0s' {1..450}; echo", timeout=5)
    assert result.output == b"a" * 450 + b"\r\n"


def test_multiline_command_runs_as_one_unit(shell):
    result = shell.run("echo one\necho two", timeout=5)
    assert result.output == b"one\r\ntwo\r\n" and not result.timed_out


def test_line_longer_than_the_terminal_accepts_still_runs_whole(shell):
    result = shell.run("echo " + "x" * 20000 + " | wc -c; cd /tmp", timeout=5)
    assert result.output == b"20001\r\n" and shell.prompt() == "user@sandbox:/tmp$ "


def test_heredoc_command(shell):
    assert shell.run("cat <<EOF\nx y\nEOF", timeout=5).output == b"x y\r\n"


def test_syntax_error_is_bash_message_and_never_reaches_the_shell(shell):
    result = shell.run("echo )", timeout=5)
    assert result.syntax_error and result.status == 2
    assert b"syntax error near unexpected token" in result.output
    assert shell.run("echo fine", timeout=5).output == b"fine\r\n"


@pytest.mark.parametrize("command", ["if true; then echo", "echo 'open", "cat <<EOF\nno end"])
def test_incomplete_commands_are_syntax_errors(command):
    assert syntax_error(command) is not None


@pytest.mark.parametrize("command", ["", "  \n", "# just a thought"])
def test_blank_or_comment_line_just_shows_the_prompt_again(shell, command):
    shell.run("false", timeout=5)
    result = shell.run(command, timeout=5)
    assert (result.output, result.status, result.syntax_error) == (b"", 1, False)


def test_history_expansion_is_off(shell):
    assert shell.run("echo hi!", timeout=5).output == b"hi!\r\n"


@pytest.mark.parametrize("command", ["sleep 1000", "cat", "yes > /dev/null"])
def test_command_that_never_returns_is_interrupted_and_shell_continues(shell, command):
    result = shell.run(command, timeout=0.5)
    assert result.timed_out and not result.restarted and result.status == 130
    assert shell.run("echo next", timeout=5).output == b"next\r\n"


def test_ctrl_c_reaches_the_command_when_sekft_itself_ignores_it():
    # Started from nohup or a script's background job, sekft inherits SIGINT ignored; the
    # sandboxed shell must not, or every hang would cost the shell and its state.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with Sandbox.create() as box, Shell(box) as shell:
            result = shell.run("sleep 1000", timeout=0.5)
            assert result.timed_out and not result.restarted and result.status == 130
    finally:
        signal.signal(signal.SIGINT, previous)


def test_command_ignoring_ctrl_c_gets_shell_restarted():
    with Sandbox.create() as box, Shell(box, kill_grace=0.5) as shell:
        shell.run("cd /tmp", timeout=5)
        result = shell.run("trap '' INT; sleep 1000", timeout=0.5)
        assert result.timed_out and result.restarted
        assert "shell was killed and a new one started" in observe(result, shell.prompt())
        assert shell.run("pwd", timeout=5).output == b"/home/user\r\n"


def test_flood_of_output_is_kept_as_head_and_tail():
    with Sandbox.create() as box, Shell(box, kill_grace=0.5, keep=4096) as sh:
        result = sh.run("seq 1 200000", timeout=10)
    assert result.output.startswith(b"1\r\n2\r\n") and result.output.endswith(b"200000\r\n")
    assert result.omitted > 0 and len(result.output) <= 3 * 4096


def test_yes_is_cut_off_and_its_observation_capped(shell):
    result = shell.run("yes", timeout=0.5)
    text = observe(result, shell.prompt(), max_bytes=1000)
    assert result.timed_out and "bytes omitted" in text and len(text) < 1300


def test_exit_ends_the_shell(shell):
    result = shell.run("exit 3", timeout=5)
    assert result.ended and result.status == 3 and not shell.alive


def test_panic_records_its_reason_and_shows_it(shell):
    result = shell.run("panic 'no deploy key'", timeout=5)
    assert result.panic_reason == "no deploy key"
    assert result.output == b"panic: no deploy key\r\n"


def test_type_probe_keeps_the_models_exit_status(shell):
    shell.run("false", timeout=5)
    assert shell.probe_type("ls") == "file" and shell.probe_type("cd") == "builtin"
    assert shell.probe_type("no-such-thing") == ""
    assert shell.run("echo $?", timeout=5).output == b"1\r\n"


def test_type_probe_is_not_fooled_by_a_job_notice_before_the_prompt(shell):
    shell.run("sleep 0.2 &", timeout=5)
    time.sleep(0.5)
    assert shell.probe_type("no-such-thing") == ""
    assert shell.probe_type("ls") == "file"


def test_clean_strips_ansi_and_applies_carriage_returns():
    raw = b"\x1b[31mred\x1b[0m\r\n10%\r50%\r100%\r\n\x1b]0;title\x07done\x07\r\n"
    assert clean(raw) == "red\n100%\ndone\n"


def test_clean_reads_man_page_overstrike_as_plain_text():
    raw = b"N\x08NA\x08AM\x08ME\x08E\r\n  -\x08--\x08-y\x08ye\x08es\x08s _\x08f_\x08i_\x08le\r\n"
    assert clean(raw) == "NAME\n  --yes file\n"


@pytest.mark.parametrize(("line", "shown"), [
    ("10%\r50%\r100%", "100%"), ("hello\rJ", "Jello"), ("crlf file line\r", "crlf file line"),
])
def test_carriage_return_overwrites_like_a_terminal(line, shown):
    assert overwrite(line) == shown


@pytest.mark.parametrize(("line", "shown"), [
    ("A\bA", "A"), ("_\bX", "X"), ("N\bNA\bAM\bME\bE", "NAME"), ("ab\b\b\bc", "cb"),
    ("abc\b\rx", "xbc"),
])
def test_backspace_overwrites_like_a_terminal(line, shown):
    assert overwrite(line) == shown


def test_clean_drops_trailing_spaces_a_terminal_would_not_show():
    assert clean(b"LEDGER(1)    LEDGER(1)     \t\r\n  indented\r\n") == (
        "LEDGER(1)    LEDGER(1)\n  indented\n")


def test_overstruck_output_reads_as_on_screen(shell):
    assert clean(shell.run("printf 'A\\bA\\n_\\bX\\n'", timeout=5).output) == "A\nX\n"


def test_terminal_is_80_columns_for_the_shell_and_man(shell):
    result = shell.run("stty size; echo $COLUMNS $MANWIDTH", timeout=5)
    assert result.output == b"50 80\r\n80 80\r\n"


def test_cap_keeps_head_and_tail_and_counts_what_it_dropped():
    text = "a" * 100 + "b" * 100
    assert cap(text, 50) == "a" * 25 + "\n[... 150 bytes omitted ...]\n" + "b" * 25


@settings(max_examples=50, deadline=None)
@given(st.text(max_size=300), st.integers(min_value=2, max_value=200))
def test_cap_is_identity_when_text_fits_and_bounded_otherwise(text, max_bytes):
    capped = cap(text, max_bytes)
    if len(text.encode()) <= max_bytes:
        assert capped == text
    else:
        assert len(capped.encode()) <= max_bytes + len("\n[... 9999 bytes omitted ...]\n")


def test_login_is_banner_then_prompt():
    assert login(b"Welcome\r\n", "user@sandbox:~$ ") == "Welcome\nuser@sandbox:~$ "
    assert login(b"", "user@sandbox:~$ ") == "user@sandbox:~$ "


def test_observation_newline_terminates_output_then_prompt():
    result = CommandResult("printf abc", b"abc", status=0)
    assert observe(result, "$ ") == "abc\n$ "
    assert observe(CommandResult("true", b"", status=0), "$ ") == "$ "


def test_observation_notes_an_interrupted_command():
    result = CommandResult("sleep 9", b"\r\n", status=130, timeout=2, timed_out=True)
    assert observe(result, "$ ") == "\n[sekft: no prompt 2s after the command; sent Ctrl-C]\n$ "


def test_shell_that_died_between_commands_reports_the_session_ended(shell):
    shell.run("(sleep 0.2; kill -9 $$) > /dev/null 2>&1 &", timeout=5)
    time.sleep(0.6)
    assert shell.run("echo too late", timeout=5).ended


FENCED_REPLY = "```bash\ncat WELCOME\n```"


@pytest.mark.parametrize("reply", [FENCED_REPLY, "bash", "bash -i"])
def test_a_nested_bash_never_passes_for_the_prompt_nor_desynchronises_the_reader(reply):
    # Chat models answer in fences: the backticks run an interactive bash reading the
    # terminal. Whatever becomes of it, probes and commands afterwards get their own output.
    with Sandbox.create() as box, Shell(box, kill_grace=1.0) as sh:
        sh.run("echo hello > WELCOME", timeout=5)
        nested = sh.run(reply, timeout=1)
        assert nested.timed_out and b"SEKFT" not in nested.output
        assert sh.probe_type("ls") == "file" and sh.probe_type("cd") == "builtin"
        assert sh.run("echo next", timeout=5).output == b"next\r\n"
        assert sh.probe_type("cat") == "file"
        assert sh.run("cd /tmp; echo $?", timeout=5).output == b"0\r\n"
        assert sh.prompt() == "user@sandbox:/tmp$ "


@pytest.mark.parametrize("command", [
    'echo "${PS1@P}"; sleep 0.3; echo after',
    "bash -c 'printf \"%s\\n\" \"${PS1@P}\"'; sleep 0.3; echo after",
    "tr '\\0' '\\n' < /proc/$$/environ | grep -a PS1; sleep 0.3; echo after",
])
def test_a_command_printing_the_prompt_it_can_see_does_not_end_the_read(shell, command):
    result = shell.run(command, timeout=5)
    assert result.output.endswith(b"after\r\n") and not result.timed_out
    assert shell.run("echo next", timeout=5).output == b"next\r\n"


def test_an_interrupted_command_that_printed_the_prompt_leaves_the_reader_in_step(shell):
    # Ctrl-C drops the prompt script, so bash prompts with the old nonce; the old prompt the
    # command printed before hanging must not be taken for the next command's.
    result = shell.run('echo "${PS1@P}"; sleep 1000', timeout=0.5)
    assert result.timed_out and result.status == 130
    assert shell.run("echo next", timeout=5).output == b"next\r\n"
    assert shell.run("echo again", timeout=5).output == b"again\r\n"


def test_panic_is_recorded_inside_output_larger_than_the_reader_keeps(shell):
    result = shell.run("yes | head -c 300000; panic 'x'; yes | head -c 300000", timeout=10)
    assert result.omitted > 0 and result.panic_reason == "x"


def test_panic_is_recorded_whatever_its_output_does(shell):
    result = shell.run("panic 'quiet' > /dev/null 2>&1 < /dev/null", timeout=5)
    assert result.panic_reason == "quiet"
    assert shell.run("echo no panic", timeout=5).panic_reason is None


def test_a_fifo_or_symlink_left_where_panic_records_is_no_panic_and_never_blocks(shell):
    result = shell.run("mkfifo /opt/sekft/record/panic; echo made", timeout=5)
    assert result.output == b"made\r\n" and result.panic_reason is None
    result = shell.run("ln -s ~/x /opt/sekft/record/panic", timeout=5)
    assert result.panic_reason is None
    assert shell.run("panic 'after all'", timeout=5).panic_reason == "after all"


def test_type_probe_stays_in_step_when_a_fork_bomb_holds_every_process_slot():
    with Sandbox.create(limits=Limits(processes=12)) as box, Shell(box, kill_grace=3.0) as sh:
        # Quiet: the bomb's own "fork: retry" complaints would land in later outputs.
        sh.run(":(){ :|:& };: 2>/dev/null", timeout=1)
        sh.run("false", timeout=5)
        assert sh.probe_type("ls") == "file" and sh.probe_type("cd") == "builtin"
        # (bash may add notices of the bomb's jobs ending, as on a real terminal.)
        assert b"1\r\nin step\r\n" in sh.run("echo $?; echo in step", timeout=5).output

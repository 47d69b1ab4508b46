"""A persistent bash in the sandbox, driven through a terminal (pexpect), one command at a time.

The shell is interactive (job control, Ctrl-C, `cd` and variables persist) but tamed:
- no rc files, no readline (`--noediting`, so no bracketed paste or line editing), no echo
  of what we type, history expansion off, TERM=dumb, pagers are `cat`, and a fixed 80x50
  terminal (the pty inserts no line breaks, so a longer line still arrives whole);
- PS1 is a sentinel carrying the exit status and `\\w` behind a random nonce that changes
  with every line the harness types; the reader waits for the current one, so output is
  exactly what the command printed. The prompt the model sees is rendered from it
  (`user@sandbox:~$ `). The new nonce is set by a builtin-only script sourced after the
  command has run (see sandbox.PROMPT_SCRIPT), so nothing a command prints by accident, an
  old prompt echoed back or a nested `bash` (PS1 is not exported), ends the read early;
- each command line is first parsed with `bash -n`; a syntax error never reaches the shell
  (it could leave bash waiting for more input), the model sees bash's own message instead.
  A command is sent wrapped in `{ ...\\n} ; { . prompt NONCE $?; } 2>/dev/null` so a
  multi-line command is one unit, is parsed whole before it runs, and yields one prompt (the
  prompt script's stderr goes nowhere, so `set -x` traces the model's commands, not the
  harness's). One with a line too long for the terminal, or with a control character the
  terminal would act on (^C, ^D, ^U, DEL...: tab, newline and carriage return are typed as
  keys), is sourced from a file instead;
- before each line it types, the harness puts the terminal back in the mode it started in
  (echo off, ^C interrupts...): a `stty echo` or `stty erase a` lasts for the command line
  that ran it, and can neither show the harness's typing nor rewrite it;
- a line with nothing to run (blank, only comments) just shows the prompt again; one of
  only assignments (`DIR=/tmp`) runs like any other;
- `panic` writes its reason to a file the reader collects after each command
  (Sandbox.take_panic), so no amount of output around it can lose it;
- a per-command wall-clock timeout sends Ctrl-C; if no prompt comes back within a grace
  period the whole sandbox is killed and a fresh shell started (the world on disk stays).
  A shell that ends at that Ctrl-C (`exec sleep 100`) is restarted the same way: the
  harness ended it, not the model.
"""

from __future__ import annotations

import functools
import os
import re
import secrets
import shlex
import signal
import subprocess
import termios
import time
from dataclasses import dataclass
from pathlib import Path

import pexpect

from sekft.errors import SandboxError
from sekft.sandbox import COLUMNS, HOSTNAME, LINES, USER, Sandbox

START_TIMEOUT = 30.0
# The terminal's line discipline keeps at most 4095 bytes of a line being typed; a longer
# line is sourced from a file instead (same shell, same effect, just not typed).
MAX_TYPED_LINE = 4000
TYPE_WORDS = ("alias", "keyword", "function", "builtin", "file")
ASSIGNMENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\[[^\]]*\])?\+?=")
# Characters the terminal's line discipline acts on when typed (^C, ^D, ^U, ^W, ^S, ^Z, DEL...)
# or that no key sends; tab, newline and carriage return (Enter) are typed as they are.
TERMINAL_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


@dataclass
class CommandResult:
    """What one command line did. `output` is raw terminal bytes (see observation.py).

    When the output was huge, `output` is its first and last `keep` bytes joined, and
    `omitted` counts the bytes dropped in between.
    """

    command: str
    output: bytes
    omitted: int = 0
    status: int | None = None
    cwd: str = "~"
    timeout: float = 0.0
    timed_out: bool = False
    restarted: bool = False
    ended: bool = False
    syntax_error: bool = False
    panic_reason: str | None = None


@functools.lru_cache(maxsize=4096)
def syntax_error(command: str) -> str | None:
    """bash's complaint about `command` as typed at a prompt, or None if it parses.

    A here-document left open at the end counts as an error too: an interactive bash would
    sit waiting for its delimiter.
    """
    # The line the command is sent as must parse too, unless there is nothing to run.
    wrapped = [] if blank(command) else [typed_line(command, "prompt", "0")]
    for text in [command, *wrapped]:
        done = subprocess.run(["bash", "-n"], input=text.encode("utf-8", "replace"),
                              capture_output=True)
        err = done.stderr.decode("utf-8", "replace")
        if done.returncode != 0 or "here-document" in err:
            return err if err.strip() else "bash: syntax error: unexpected end of file\n"
    return None


def blank(command: str) -> bool:
    """Whether `command` has nothing for bash to run: every line is blank or a comment. (A
    line of only assignments, `DIR=/tmp`, has something to run.)"""
    lines = command.replace("\r", "\n").split("\n")  # the terminal types \r as Enter
    return all(line.strip(" \t") == "" or line.lstrip(" \t").startswith("#") for line in lines)


def first_word(command: str) -> str | None:
    """The word bash would run first in `command` (after `VAR=x` assignments and `!`, and
    past a list operator that ends a command of only assignments: `x=1; ls` runs `ls`).

    None when there is none (empty, only comments, only assignments) or it cannot be split
    (open quote).
    """
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        for token in lexer:
            if token in ("!", ";", "&", "&&", "||", "|") or ASSIGNMENT_RE.match(token):
                continue
            return token
    except ValueError:
        return None
    return None


def typed_line(command: str, prompt_script: str, nonce: str) -> str:
    """What the shell is sent for `command`: one brace group, then the prompt script sourced
    with the next nonce and the group's status, all parsed before anything runs."""
    return "{ " + command + f"\n}} ; {hidden(f'. {shlex.quote(prompt_script)} {nonce} $?')}\n"


def hidden(commands: str) -> str:
    """`commands` (builtins of the harness's own) as a group whose stderr goes nowhere: under
    the model's `set -x` their trace would otherwise end every observation."""
    return "{ " + commands + "; } 2>/dev/null"


def sentinel(*nonces: str) -> re.Pattern:
    """The prompt the shell prints once PS1 carries one of `nonces`: status and directory."""
    either = b"|".join(n.encode() for n in nonces)
    return re.compile(rb"\x1eSEKFT(?:" + either + rb") (\d+) ([^\x1f]*)\x1f")


class _Capture:
    """Terminal bytes of one command: all of them, or head and tail once past 2*keep."""

    def __init__(self, keep: int):
        self.keep = keep
        self.head = b""
        self.body = bytearray()
        self.omitted = 0
        self.received = 0

    def add(self, chunk: bytes) -> None:
        self.received += len(chunk)
        self.body += chunk
        if not self.head and len(self.body) > 2 * self.keep:
            self.head = bytes(self.body[: self.keep])
            del self.body[: self.keep]
        if self.head and len(self.body) > 2 * self.keep:
            drop = len(self.body) - self.keep
            self.omitted += drop
            del self.body[:drop]

    def search_end(self, pattern: re.Pattern, chunk_len: int, since: int = 0) -> re.Match | None:
        """The first match of `pattern` that ends in the newest chunk and starts at or after
        the `since`-th byte received."""
        # The sentinel is bounded by PATH_MAX, so only the newest bytes need searching.
        start = max(0, len(self.body) - chunk_len - 8192,
                    since - (self.received - len(self.body)))
        return pattern.search(self.body, start)

    def output(self) -> bytes:
        return self.head + bytes(self.body)


class Shell:
    """A persistent sandboxed bash. Use as a context manager, or call close()."""

    def __init__(self, sandbox: Sandbox, kill_grace: float = 2.0, keep: int = 64 * 1024):
        self.sandbox = sandbox
        self.kill_grace = kill_grace
        self.keep = keep
        self.child: pexpect.spawn | None = None
        self.cwd = "~"
        self.status = 0
        self.start()

    def __enter__(self) -> Shell:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Start a fresh bash in the sandbox and wait for its first prompt."""
        self.nonce = secrets.token_hex(8)
        env = self.sandbox.env({
            "SEKFT_PS1": f"\\036SEKFT{self.nonce} $? \\w\\037",
            "HISTFILE": "",
            "HISTCONTROL": "ignorespace",
        })
        # A non-interactive bash (the limits wrapper) drops PS1 from the environment, so the
        # prompt travels as SEKFT_PS1 and becomes PS1 just before the interactive exec; once
        # bash is up, the prompt script un-exports it and moves to a fresh nonce.
        argv = self.sandbox.argv(["/bin/bash", "-c", (
            'export PS1="$SEKFT_PS1" PS2=""; unset SEKFT_PS1; '
            "exec /bin/bash --noprofile --norc --noediting +H -i"
        )])
        try:
            self.child = pexpect.spawn(argv[0], argv[1:], env=env, cwd=self.sandbox.cwd(),
                                       echo=False, dimensions=(LINES, COLUMNS), timeout=None,
                                       preexec_fn=self.sandbox.preexec())
        except pexpect.ExceptionPexpect as e:
            raise SandboxError(f"could not start the sandboxed shell: {e}") from None
        # pexpect's default pauses (50 ms before every send, 100 ms around a close) exist
        # for slow human-facing programs; they would dominate every turn here.
        self.child.delaybeforesend = None
        self.child.delayafterclose = self.child.ptyproc.delayafterclose = 0.0
        self.child.delayafterterminate = self.child.ptyproc.delayafterterminate = 0.01
        self.mode = termios.tcgetattr(self.child.child_fd)
        capture = _Capture(self.keep)
        deadline = time.monotonic() + START_TIMEOUT
        outcome = self._read(capture, deadline)
        if outcome == "prompt":
            outcome = self._source_prompt("0", capture, deadline)
        if outcome != "prompt":
            said = capture.output().decode("utf-8", "replace").strip()[-500:]
            self.close()
            raise SandboxError(f"the sandboxed shell did not start ({outcome}): {said!r}")

    def close(self) -> None:
        """Kill the shell and, with it, everything in its sandbox."""
        if self.child is not None:
            if self.sandbox.bwrap is not None and self.child.isalive():
                # Kill bubblewrap's inner process first, so the outer one reaps it: killed
                # from outside, the inner one is orphaned and left a zombie under a pid 1
                # that may not reap (a container's). Its pid namespace dies with it.
                for pid in child_pids(self.child.pid):
                    _kill(pid)
            try:
                self.child.close(force=True)
            except pexpect.ExceptionPexpect:
                self.child.kill(signal.SIGKILL)
            self.child = None

    @property
    def alive(self) -> bool:
        return self.child is not None and self.child.isalive()

    def prompt(self) -> str:
        """The prompt as the model sees it, for the current directory."""
        return f"{USER}@{HOSTNAME}:{self.cwd}$ "

    def _read(self, capture: _Capture, deadline: float,
              expect: re.Pattern | None = None) -> str:
        """Read into `capture` until the prompt (`expect`, default: the current nonce's;
        "prompt"), EOF ("eof") or `deadline` ("timeout"). Only bytes that arrive during this
        call can be the prompt."""
        assert self.child is not None
        expect = expect or sentinel(self.nonce)
        since = capture.received
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return "timeout"
            try:
                chunk = self.child.read_nonblocking(65536, timeout=min(left, 0.5))
            except pexpect.TIMEOUT:
                continue
            except pexpect.EOF:
                return "eof"
            capture.add(chunk)
            found = capture.search_end(expect, len(chunk), since)
            if found:
                self.status = int(found.group(1))
                self.cwd = found.group(2).decode("utf-8", "replace")
                del capture.body[found.start():]
                return "prompt"

    def run(self, command: str, timeout: float) -> CommandResult:
        """Run one command line (may span lines) and return what it did.

        Never raises for anything the command does: a syntax error, a hang, a flood of output,
        the shell exiting or being killed all come back as a CommandResult.
        """
        error = syntax_error(command)
        if error is not None:
            self.status = 2
            return CommandResult(command, error.encode(), status=2, cwd=self.cwd,
                                 timeout=timeout, syntax_error=True)
        result = CommandResult(command, b"", cwd=self.cwd, timeout=timeout)
        if blank(command):
            # Blank or only comments: bash would just print the next prompt ("{ }" would
            # not even parse).
            result.status = self.status
            return result
        if not self.alive:
            # Ended between commands (a background job killed it, say): the session is over.
            result.ended = True
            return result
        assert self.child is not None
        capture = _Capture(self.keep)
        before, self.nonce = self.nonce, secrets.token_hex(8)
        prompt_script = self.sandbox.prompt_script()
        typed = typed_line(command, prompt_script, self.nonce)
        longest = max(len(line.encode("utf-8", "replace")) for line in typed.split("\n"))
        if longest > MAX_TYPED_LINE or TERMINAL_CONTROL_RE.search(command):
            source = f". {shlex.quote(self.sandbox.input_file(command + chr(10)))}"
            typed = typed_line(source, prompt_script, self.nonce)
        try:
            self._type(typed)
            outcome = self._read(capture, time.monotonic() + timeout)
        except OSError:
            outcome = "eof"
        if outcome == "timeout":
            result.timed_out = True
            outcome = self._interrupt(capture, before)
        if outcome == "timeout" or (result.timed_out and outcome == "eof"):
            # No prompt even after Ctrl-C, or the shell ended at that Ctrl-C (it had exec'd
            # the command): either way the harness, not the model, ended this shell.
            self.close()
            self.start()
            result.restarted = True
        elif outcome == "eof":
            result.ended = True
            self.child.close(force=True)
            result.status = self.child.exitstatus
            self.child = None
        else:
            result.status = self.status
        result.cwd = self.cwd
        result.output = capture.output()
        result.omitted = capture.omitted
        result.panic_reason = self.sandbox.take_panic()
        return result

    def _interrupt(self, capture: _Capture, before: str) -> str:
        """Ctrl-C the running command and get back in step: "prompt", "eof" or "timeout".

        Ctrl-C abandons the rest of the typed line, prompt script included, so bash prompts
        with the nonce from `before` the command. The prompt script then moves to a fresh
        one: whatever the interrupted command left on screen cannot pass for the next prompt.
        """
        assert self.child is not None
        self.child.sendcontrol("c")
        deadline = time.monotonic() + self.kill_grace
        outcome = self._read(capture, deadline, sentinel(self.nonce, before))
        if outcome != "prompt":
            return outcome
        return self._source_prompt(str(self.status), capture, deadline)

    def _source_prompt(self, status: str, capture: _Capture, deadline: float,
                       before: str = "") -> str:
        """Send `before` then the prompt script with a fresh nonce and `status` as one hidden
        line (leading space: not in history), and read to its prompt."""
        assert self.child is not None
        self.nonce = secrets.token_hex(8)
        script = f"{before}. {shlex.quote(self.sandbox.prompt_script())} {self.nonce} {status}"
        try:
            self._type(f" {hidden(script)}\n")
        except OSError:
            return "eof"
        return self._read(capture, deadline)

    def _type(self, line: str) -> None:
        """Type `line` into the terminal as it was at start. The model's `stty` may have
        changed its mode (bash keeps what a command left): with echo on the harness's line
        would show in the output, a changed erase or kill character would rewrite it."""
        assert self.child is not None
        try:
            termios.tcsetattr(self.child.child_fd, termios.TCSANOW, self.mode)
        except termios.error:
            pass  # the shell is gone: the send or the read says so
        self.child.send(line.encode("utf-8", "replace"))

    def probe_type(self, word: str) -> str:
        """bash's `type -t` of `word` in the shell's current state ('' if not runnable).

        Builtins only, so it never forks (a fork bomb may hold every process slot), and the
        prompt script hands back the model's last status, so its next `$?` is still its own.
        """
        if "\n" in word or "\x00" in word or not self.alive:
            return ""
        quoted = "'" + word.replace("'", "'\\''") + "'"
        capture = _Capture(self.keep)
        outcome = self._source_prompt(str(self.status), capture, time.monotonic() + 10.0,
                                      before=f"type -t -- {quoted} 2>/dev/null; ")
        if outcome != "prompt":
            return ""
        # bash may add a job's notice ("[1]+  Done ...") before the prompt: only a line that
        # `type -t` can print counts.
        lines = capture.output().decode("utf-8", "replace").split()
        return next((line for line in lines if line in TYPE_WORDS), "")


def child_pids(pid: int) -> list[int]:
    """Host pids of `pid`'s direct children (from /proc; [] when it is gone)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The command name may hold spaces and parentheses: split after its last ')'.
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass

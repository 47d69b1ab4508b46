"""THE observation format: what the model reads after each command (eval and recorder alike).

Training data and eval must show the model byte-identical observations, so both the
evaluator and the scenarios' trajectory recorder build every user turn with `login` (the
first) and `observe` (each later one), and nothing else.

The first user turn is what a terminal shows after login:

    <motd, cleaned, newline-terminated if not empty><prompt>

Every later user turn is the output of the previous command line:

    <output, cleaned, capped, newline-terminated if not empty>[<note>\\n]<prompt>

- cleaned: decoded as UTF-8 (bad bytes become U+FFFD); `\\r\\n` becomes `\\n`; ANSI escape
  sequences (CSI, OSC, two-byte ESC) are removed; a lone `\\r` returns to the start of the
  line and a backspace one column back, and what follows overwrites, as on a terminal
  (`10%\\r100%` shows `100%`, a CRLF file shows its lines, man's overstruck bold `N\\bN`
  and underline `_\\bN` show `N`); other control characters except tab are removed, and so
  are spaces and tabs at the end of a line (invisible on a terminal, they would only eat
  into the cap).
- capped: at most `max_bytes` UTF-8 bytes of output; a longer output keeps its first and
  last `max_bytes // 2` bytes around the line `[... N bytes omitted ...]`, where N counts
  the cleaned bytes dropped plus the raw bytes the shell reader had already dropped.
- the note, when there is one, tells the model what the harness did: the command timed out
  and was interrupted, or was killed and the shell restarted.
- the prompt is `user@sandbox:<dir>$ ` with the directory as bash's `\\w` shows it (~ for
  home).
"""

from __future__ import annotations

import re

from sekft.shell import CommandResult

MAX_OUTPUT_BYTES = 4096

ANSI_RE = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI: colours, cursor moves
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"  # OSC: window titles, hyperlinks
    r"|\x1b[@-Z\\-_]"  # two-byte escapes
)
CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def clean(raw: bytes) -> str:
    """Terminal bytes -> the text a reader of the terminal would see (rules in the docstring)."""
    text = raw.decode("utf-8", "replace").replace("\r\n", "\n")
    text = ANSI_RE.sub("", text)
    lines = (CONTROL_RE.sub("", overwrite(line)).rstrip(" \t") for line in text.split("\n"))
    return "\n".join(lines)


def overwrite(line: str) -> str:
    """A line as a terminal shows it: `\\r` returns to column 0, `\\b` goes one column back
    (not past the first), and later text overwrites what is under the cursor."""
    if "\r" not in line and "\b" not in line:
        return line
    cells: list[str] = []
    column = 0
    for char in line:
        if char == "\r":
            column = 0
        elif char == "\b":
            column = max(0, column - 1)
        else:
            cells[column:column + 1] = [char]
            column += 1
    return "".join(cells)


def cap(text: str, max_bytes: int = MAX_OUTPUT_BYTES, already_omitted: int = 0) -> str:
    """`text` if it fits in `max_bytes` UTF-8 bytes (and nothing was omitted before), else
    its head and tail halves joined by an omission marker counting every dropped byte."""
    data = text.encode("utf-8")
    if len(data) <= max_bytes and already_omitted == 0:
        return text
    half = max_bytes // 2
    if len(data) <= max_bytes:
        head, tail = data, b""
    else:
        head, tail = data[:half], data[-half:] if half else b""
    omitted = len(data) - len(head) - len(tail) + already_omitted
    head_text = head.decode("utf-8", "ignore")
    tail_text = tail.decode("utf-8", "ignore")
    sep_before = "" if not head_text or head_text.endswith("\n") else "\n"
    return f"{head_text}{sep_before}[... {omitted} bytes omitted ...]\n{tail_text}"


def note_for(result: CommandResult) -> str | None:
    """What the harness tells the model it did to this command, if anything."""
    if result.restarted:
        return (f"[sekft: no prompt {result.timeout:g}s after the command, even after Ctrl-C; "
                "the shell was killed and a new one started in ~ "
                "(working directory, variables and background jobs are gone)]")
    if result.timed_out:
        return f"[sekft: no prompt {result.timeout:g}s after the command; sent Ctrl-C]"
    return None


def _terminated(text: str) -> str:
    return text if not text or text.endswith("\n") else text + "\n"


def login(banner: bytes | str, prompt: str) -> str:
    """The first user turn: the login banner (motd) then the prompt. No task text."""
    raw = banner.encode("utf-8") if isinstance(banner, str) else banner
    return _terminated(clean(raw)) + prompt


def observe(result: CommandResult, prompt: str, max_bytes: int = MAX_OUTPUT_BYTES) -> str:
    """The user turn after `result`'s command: output, harness note, then `prompt`."""
    text = _terminated(cap(clean(result.output), max_bytes, result.omitted))
    note = note_for(result)
    if note is not None:
        text += note + "\n"
    return text + prompt

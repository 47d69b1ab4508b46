"""Detours: an expert episode played again with one step it would not take inserted, that
step shown in the context but not trained (`weight: 0`), the expert's next step trained.

Three kinds, each the state a small model measurably gets stuck in, and the way out:
- **a repeat** of a read-only step. Under greedy decoding a small model that has run
  `cat orders` and seen its output tends to run it again, and again, until the turn budget
  (the loops measured on the real SmolLM2 adapter). An expert never repeats itself, so
  nothing it records shows the state "I already ran this and saw what it prints".
- **a wrong guess** at a tool nobody named. Told "Please put notes/hat.txt out on anchor",
  the adapter ran `anchor --help`, read "command not found", then `cat anchor` until the
  budget: it had never seen a guess fail. An expert of a family whose directive does not
  name its tool looks in /usr/local/bin straight away; a guess detour puts a word of the
  directive in front of that step as the guessed tool (`WORD --help` or `man WORD`).
- **a wrong way of asking for help.** Told "tally: unknown command 'help'; see tally
  --help", the adapter ran `tally help` again, four times (the real SmolLM2 adapter on the
  hand-written tally). An expert asks the right way first, so nothing it records shows a
  refused help request followed by the form the refusal names. A wrong-help detour puts
  another form (`T --help`, `T -h`, `T help`, `man T`) in front of the expert's first
  request for documentation.

The inserted step is played in the sandbox like any command, so its observation is what
the shell really printed.
"""

from __future__ import annotations

import random
import re
import shlex

# Programs whose repeat prints the same and changes nothing, given no redirect or pipe.
READ_ONLY = frozenset({"cat", "grep", "head", "id", "ls", "man", "pwd", "tail", "wc",
                       "whoami"})
HELP_ARGS = (["--help"], ["-h"], ["help"])


def is_read_only(command: str) -> bool:
    """True for one simple command that reads and prints only: a READ_ONLY program, or any
    program asked only for its help. Redirects, pipes, lists and substitutions are not."""
    if any(c in command for c in "<>|;&`\n") or "$(" in command:
        return False
    try:
        words = shlex.split(command)
    except ValueError:
        return False
    return bool(words) and (words[0] in READ_ONLY or words[1:] in HELP_ARGS)


def detour_step(commands: list[str], key: str) -> int | None:
    """The index of the command to repeat in `commands` (an expert's, ending in exit or
    panic), chosen by `key` (the scenario id) among the read-only ones before the last;
    None when there is none."""
    candidates = [n for n, c in enumerate(commands[:-1]) if is_read_only(c)]
    if not candidates:
        return None
    return random.Random(f"detour:{key}").choice(candidates)


# How an expert finds a tool its directive does not name.
FIND_TOOL = "ls /usr/local/bin"
# Words of a directive that nobody would take for a tool's name.
NOT_GUESSED = frozenset({
    "about", "after", "again", "before", "channel", "done", "file", "first", "from", "have",
    "hello", "here", "into", "just", "need", "needs", "note", "notes", "please", "read",
    "regards", "than", "thank", "thanks", "that", "them", "then", "there", "this", "today",
    "user", "what", "when", "where", "which", "will", "with", "work", "your",
})  # fmt: skip
GUESS_WORD_RE = re.compile(r"(?<![\w./~-])([a-z]{4,})(?![\w/.-]*[\w/])")


def guess_step(commands: list[str]) -> int | None:
    """The index of the expert's `ls /usr/local/bin` (where it looks for a tool nobody
    named), where a wrong guess goes in front; None when it never looks there."""
    return commands.index(FIND_TOOL) if FIND_TOOL in commands else None


def wrong_guess(directive: str, key: str) -> str | None:
    """A command that takes a word of `directive` (what the expert read just before it
    looked for the tool) for the tool's name: `WORD --help` or `man WORD`, both chosen by
    `key` (the scenario id). Words are lowercase, 4 letters or more, standing alone (not
    part of a path or file name) and not in NOT_GUESSED, from a mail's body when the
    directive is a mail, never from the prompt on its last line; None when there is no such word."""
    directive = directive.rpartition("\n")[0]  # the last line is the prompt
    if directive.startswith("From "):
        directive = directive.partition("\n\n")[2]
    words = sorted({w for w in GUESS_WORD_RE.findall(directive) if w not in NOT_GUESSED})
    if not words:
        return None
    pick = random.Random(f"guess:{key}")
    word = pick.choice(words)
    return pick.choice([f"{word} --help", f"man {word}"])


HELP_FORMS = ("{} --help", "{} -h", "{} help", "man {}")


def help_tool(command: str) -> str | None:
    """The tool `command` asks for its documentation in one of HELP_FORMS, else None."""
    words = command.split()
    if len(words) != 2 or any(c in command for c in "<>|;&`'\"$"):
        return None
    if words[0] == "man":
        return words[1]
    return words[0] if words[1:] in HELP_ARGS else None


def help_step(commands: list[str]) -> int | None:
    """The index of the expert's first request for a tool's documentation (a HELP_FORMS
    command), where a wrong way of asking goes in front; None when it makes none."""
    return next((n for n, c in enumerate(commands[:-1]) if help_tool(c)), None)


def wrong_help(command: str, key: str) -> str:
    """Another HELP_FORMS way to ask `command`'s tool for its documentation, chosen by
    `key` (the scenario id)."""
    tool = help_tool(command)
    if tool is None:
        raise ValueError(f"{command!r} does not ask a tool for its documentation")
    others = [form.format(tool) for form in HELP_FORMS if form.format(tool) != command]
    return random.Random(f"wrong-help:{key}").choice(others)


def with_step(commands: list[str], at: int, command: str) -> list[str]:
    """`commands` with `command` inserted at index `at` (it runs as turn `at`)."""
    return commands[:at] + [command] + commands[at:]


def with_repeat(commands: list[str], step: int) -> list[str]:
    """`commands` with command `step` run twice in a row."""
    return with_step(commands, step + 1, commands[step])


def mark_untrained(messages: list[dict], turn: int) -> list[dict]:
    """The episode `messages` with assistant turn `turn` (counting from 0) marked
    `weight: 0`; every other turn is left as it was."""
    out, seen = [], -1
    for m in messages:
        m = dict(m)
        if m["role"] == "assistant":
            seen += 1
            if seen == turn:
                m["weight"] = 0
        out.append(m)
    if seen < turn:
        raise ValueError(f"the episode has {seen + 1} assistant turns; no turn {turn}")
    return out

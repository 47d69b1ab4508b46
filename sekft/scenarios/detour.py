"""Detours: an expert episode played again with one read-only step repeated, the repeat
shown in the context but not trained (`weight: 0`).

Why: under greedy decoding a small model that has run `cat orders` and seen its output
tends to run it again, and again, until the turn budget (the loops measured on the real
SmolLM2 adapter). An expert never repeats itself, so nothing it records shows the state
"I already ran this and saw what it prints"; a detour shows it, and trains only the step
the expert takes next. The repeat is played in the sandbox like any command, so its
observation is what the shell really printed.
"""

from __future__ import annotations

import random
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


def with_repeat(commands: list[str], step: int) -> list[str]:
    """`commands` with command `step` run twice in a row."""
    return commands[:step + 1] + [commands[step]] + commands[step + 1:]


def mark_repeat(messages: list[dict], step: int) -> list[dict]:
    """The episode `messages` of `with_repeat(commands, step)` with the repeat (assistant turn
    step + 1, counting from 0) marked `weight: 0`; every other turn is left as it was."""
    out, seen = [], -1
    for m in messages:
        m = dict(m)
        if m["role"] == "assistant":
            seen += 1
            if seen == step + 1:
                m["weight"] = 0
        out.append(m)
    if seen <= step:
        raise ValueError(f"the episode has {seen + 1} assistant turns; no repeat of step {step}")
    return out

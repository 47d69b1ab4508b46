"""The expert of every family: a policy that plays an instance's solution through the harness.

The solution (`Instance.commands`) is written by the family next to the world it builds:
discovery first (look around, read the directive, the provider's `--help`), then the work,
then `exit` or `panic "reason"`. Run through `sekft.eval.run_episode` it meets the real
sandboxed shell, so its observations are exactly what a model would see.

A demonstration only teaches copying if what is copied was on screen first, in the form it
is typed: `unseen_words` lists the closed-list words a session's commands type before any
observation showed them in the same form (after a space, or glued to what precedes it, as
in `docs/apple.txt`: a byte-level BPE makes different tokens of the two), and the numbers
typed before any observation showed them at all. For an expert episode it must be empty.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from sekft.errors import ScenarioError
from sekft.scenarios.words import WORDS

TOKEN_RE = re.compile(r"[a-z]+|[0-9]+")
WORD_SET = frozenset(WORDS)


def expert_policy(commands: Sequence[str], scenario: str) -> Callable[[list[dict]], str]:
    """A policy (messages so far -> next command line) replaying the expert's `commands`
    (`Instance.commands`, or meta "expert" of a written scenario).

    It raises ScenarioError if asked for more turns than the solution has: the episode
    should have ended at its final `exit` or `panic`.
    """

    def policy(messages: list[dict]) -> str:
        turn = sum(m["role"] == "assistant" for m in messages)
        if turn >= len(commands):
            raise ScenarioError(f"{scenario}: the expert's solution ended at turn "
                                f"{len(commands)} but the episode went on; its family "
                                "has a bug")
        return commands[turn]

    return policy


def word_forms(text: str) -> list[tuple[str, bool]]:
    """Each run of lowercase letters or of digits in `text`, with whether a space precedes it."""
    return [(m[0], text[m.start() - 1:m.start()] == " ") for m in TOKEN_RE.finditer(text)]


def unseen_words(messages: list[dict]) -> list[tuple[int, str]]:
    """(message index, word) for each closed-list word an assistant message types that no
    earlier user message showed in the same form, and each number it types that no earlier
    user message showed at all (see the module docstring)."""
    seen_forms: set[tuple[str, bool]] = set()
    unseen = []
    for index, message in enumerate(messages):
        forms = word_forms(message["content"])
        if message["role"] == "user":
            seen_forms.update(forms)
            continue
        seen_numbers = {word for word, _ in seen_forms if word.isdigit()}
        unseen += [(index, word) for word, spaced in forms
                   if (word in WORD_SET and (word, spaced) not in seen_forms)
                   or (word.isdigit() and word not in seen_numbers)]
    return unseen

"""The expert of every family: a policy that plays an instance's solution through the harness.

The solution (`Instance.commands`) is written by the family next to the world it builds:
discovery first (look around, read the directive, the provider's `--help`), then the work,
then `exit` or `panic "reason"`. Run through `sekft.eval.run_episode` it meets the real
sandboxed shell, so its observations are exactly what a model would see.

A demonstration only teaches copying if what is copied was on screen first: `unseen_words`
lists the closed-list words (and numbers) a session's commands type before any observation
showed them; for an expert episode it must be empty.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from sekft.errors import ScenarioError
from sekft.scenarios.words import WORDS
from sekft.scenarios.world import Instance

TOKEN_RE = re.compile(r"[a-z]+|[0-9]+")
WORD_SET = frozenset(WORDS)


def expert_policy(instance: Instance) -> Callable[[list[dict]], str]:
    """A policy (messages so far -> next command line) replaying `instance.commands`.

    It raises ScenarioError if asked for more turns than the solution has: the episode
    should have ended at its final `exit` or `panic`.
    """

    def policy(messages: list[dict]) -> str:
        turn = sum(m["role"] == "assistant" for m in messages)
        if turn >= len(instance.commands):
            raise ScenarioError(f"{instance.id}: the expert's solution ended at turn "
                                f"{len(instance.commands)} but the episode went on; the "
                                f"family {instance.family!r} has a bug")
        return instance.commands[turn]

    return policy


def unseen_words(messages: list[dict]) -> list[tuple[int, str]]:
    """(message index, word) for each closed-list word or number an assistant message types
    that no earlier user message contains as a whole word."""
    seen: set[str] = set()
    unseen = []
    for index, message in enumerate(messages):
        tokens = TOKEN_RE.findall(message["content"])
        if message["role"] == "user":
            seen.update(tokens)
            continue
        unseen += [(index, t) for t in tokens
                   if (t in WORD_SET or t.isdigit()) and t not in seen]
    return unseen

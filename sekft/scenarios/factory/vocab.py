"""The arguments an instance's expert copies: names and numbers.

Two modes:

    open     names invented per instance (pronounceable, sometimes with a number), numbers
             up to four digits: a real model must copy what it reads, whatever it is;
    closed   names from the closed word list and small numbers, the ones the tiny default
             base was built on (`sekft.scenarios.words`), so that base can still copy them.

A run of the factory may also ask for `mixed`: even instance seeds open, odd ones closed
(`instance_vocab`), so a real model meets both invented names and plain English words, as
real directives have both.

Names of one instance never contain one another, so `grep NAME` finds only that name.
"""

from __future__ import annotations

import random

from sekft.errors import ConfigError
from sekft.scenarios.posts import apart
from sekft.scenarios.words import WORDS

VOCABS = ("open", "closed")
MODES = (*VOCABS, "mixed")  # what a factory run may ask for
SYLLABLE_START = "bdfgklmnprstvz"
SYLLABLE_VOWEL = "aeiou"


def instance_vocab(mode: str, seed: int) -> str:
    """The vocabulary of instance `seed` in a run asking for `mode` (one of MODES)."""
    if mode not in MODES:
        raise ConfigError(f"vocabulary {mode!r}: must be one of {', '.join(MODES)}")
    if mode == "mixed":
        return VOCABS[seed % 2]
    return mode


class Vocab:
    """Draws distinct names and numbers for one instance from `rng`."""

    def __init__(self, mode: str, rng: random.Random) -> None:
        if mode not in VOCABS:
            raise ConfigError(f"vocabulary {mode!r}: must be one of {', '.join(VOCABS)}")
        self.mode = mode
        self.rng = rng
        self.used: set[str] = set()

    def names(self, n: int) -> list[str]:
        """`n` new names, none part of another nor of any name drawn before."""
        if self.mode == "closed":
            return apart(self.rng, n, self.used)
        chosen: list[str] = []
        while len(chosen) < n:
            name = self._invent()
            if all(name not in o and o not in name for o in [*chosen, *self.used]):
                chosen.append(name)
        self.used.update(chosen)
        return chosen

    def name(self) -> str:
        return self.names(1)[0]

    def number(self, low: int = 2, high: int = 9) -> int:
        """A number in [low, high] (closed), or up to a hundred times wider (open)."""
        return self.rng.randint(low, high if self.mode == "closed" else high * 100 + 99)

    def _invent(self) -> str:
        word = "".join(self.rng.choice(SYLLABLE_START) + self.rng.choice(SYLLABLE_VOWEL)
                       for _ in range(self.rng.randint(2, 3)))
        if word in WORDS:
            return self._invent()
        if self.rng.random() < 0.3:
            word += f"{self.rng.choice('-_')}{self.rng.randint(1, 99)}"
        return word

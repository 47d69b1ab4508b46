"""The train / held-out split of the built-in suite, written down once.

Held-out means two things at once:

- whole families never seen in training (HELDOUT_FAMILIES): every instance of them is
  held-out, whatever its seed;
- unseen instances of the training families: each instance has a `key`, the arguments its
  answer depends on (the item and count to record, the file to send and to whom...). One key
  in HELDOUT_KEY_SHARE, chosen by a hash of (family, key), is reserved for the held-out split;
  a training instance never draws one and a held-out instance always does. So no held-out
  instance asks for the same thing as any training instance, while every word it uses still
  appears in training in other combinations.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable

from sekft.errors import ConfigError
from sekft.scenarios.world import Instance, family_rng

TRAIN_FAMILIES = (
    "ledger", "stash", "tally", "lookup", "config", "unpack", "rename", "relay",
    "deploy", "vault",
)
HELDOUT_FAMILIES = ("ticket", "publish")
HELDOUT_KEY_SHARE = 8


def key_is_heldout(family: str, key: tuple) -> bool:
    """Whether an instance of training family `family` asking for `key` is held-out."""
    digest = hashlib.sha256(repr((family, tuple(key))).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % HELDOUT_KEY_SHARE == 0


def default_split(family: str) -> str:
    """The split an instance of `family` belongs to when none is asked for."""
    return "heldout" if family in HELDOUT_FAMILIES else "train"


def check_split(family: str, split: str) -> None:
    """Refuse a split a family cannot provide (a held-out family has no training instances)."""
    if split not in ("train", "heldout"):
        raise ConfigError(f"split {split!r}: must be 'train' or 'heldout'")
    if split == "train" and family in HELDOUT_FAMILIES:
        raise ConfigError(f"family {family!r} is held out entirely; it has no training "
                          f"instances (training families: {', '.join(TRAIN_FAMILIES)})")


def draw_for_split(family: str, seed: int, split: str | None,
                   make: Callable[[random.Random, str], Instance]) -> Instance:
    """Draw instances with `make(rng, split)` from one stream until one's key belongs to
    `split` (default: the family's own); deterministic in (family, split, seed)."""
    split = split or default_split(family)
    check_split(family, split)
    rng = family_rng(family, split, seed)
    while True:
        instance = make(rng, split)
        if family in HELDOUT_FAMILIES or key_is_heldout(family, instance.key) == (
                split == "heldout"):
            return instance


def describe() -> str:
    """The split in words, for `sekft-eval` and the recorder to print."""
    return (
        f"training families ({len(TRAIN_FAMILIES)}): {', '.join(TRAIN_FAMILIES)}\n"
        f"held-out families, never trained ({len(HELDOUT_FAMILIES)}): "
        f"{', '.join(HELDOUT_FAMILIES)}\n"
        f"held-out instances of training families: the 1 in {HELDOUT_KEY_SHARE} task keys "
        "(what the directive asks for) reserved by hash; training instances never use them"
    )

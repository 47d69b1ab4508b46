"""sekft's built-in scenario suite: families of generated worlds, their experts, the split.

Each family is a module with `build(seed, split=None) -> Instance` (pure) and
`generate(seed, out_dir, split=None) -> Path` (writes a scenario folder in the format of
`sekft.scenario`). Every instance lands the model with no imperative: the directive is
somewhere to be found (`posts`), a provider tool invented for the family documents itself
only through `--help` and a man page, and the expert's solution (`Instance.commands`) does
the discovery, the work and ends with `exit` or `panic`. Arguments the expert copies from
what it read are words of a closed list (`words`).

The split (train / held-out) is defined in `split` and printed by `describe_split()`.
Families generated from a seed rather than written by hand are in `factory`; these twelve
are then a second held-out set.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from sekft.errors import ConfigError
from sekft.scenarios import (
    config,
    deploy,
    ledger,
    lookup,
    publish,
    relay,
    rename,
    stash,
    tally,
    ticket,
    unpack,
    vault,
)
from sekft.scenarios.split import HELDOUT_FAMILIES, TRAIN_FAMILIES
from sekft.scenarios.split import describe as describe_split
from sekft.scenarios.world import Instance

FAMILIES: dict[str, ModuleType] = {
    m.FAMILY: m
    for m in (ledger, stash, tally, lookup, config, unpack, rename, relay, deploy, vault,
              ticket, publish)
}
assert set(FAMILIES) == set(TRAIN_FAMILIES) | set(HELDOUT_FAMILIES)

__all__ = ["FAMILIES", "HELDOUT_FAMILIES", "TRAIN_FAMILIES", "Instance", "build",
           "choose_families", "describe_split", "families_of", "generate"]


def _family(name: str) -> ModuleType:
    if name not in FAMILIES:
        raise ConfigError(f"unknown scenario family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def families_of(split: str) -> tuple[str, ...]:
    """The families that have instances in `split` (every family has held-out ones)."""
    if split == "train":
        return TRAIN_FAMILIES
    if split == "heldout":
        return TRAIN_FAMILIES + HELDOUT_FAMILIES
    raise ConfigError(f"split {split!r}: must be 'train' or 'heldout'")


def choose_families(split: str, wanted: str | None) -> tuple[str, ...]:
    """The families a CLI's `--families a,b` (None: all) asks for, checked against `split`."""
    available = families_of(split)
    if wanted is None:
        return available
    chosen = tuple(f.strip() for f in wanted.split(",") if f.strip())
    wrong = [f for f in chosen if f not in available]
    if wrong or not chosen:
        raise ConfigError(f"--families: {wrong or wanted!r} have no {split} instances; choose "
                          f"from {', '.join(available)}")
    return chosen


def build(family: str, seed: int, split: str | None = None) -> Instance:
    """The instance of `family` for `seed` in `split` (default: the family's own split)."""
    return _family(family).build(seed, split)


def generate(family: str, seed: int, out_dir: str | Path, split: str | None = None) -> Path:
    """Write the scenario folder of `family`/`seed` under `out_dir`; returns its path."""
    return _family(family).generate(seed, out_dir, split)

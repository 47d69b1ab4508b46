"""The scenario factory: families generated from a seed, not written by hand.

A family seed gives a whole family (`spec.family_spec`): an invented provider (its name,
language, grammar and state file), how it documents itself, where directives are posted,
the kind of work and the endings. An instance seed gives one instance of it in the
scenario format, with its expert's episode (`instance.build_instance`), written as a
folder by `sekft.scenarios.world.write_scenario` like the built-in suite's: `sekft-eval
--scenarios` and `python -m sekft.scenarios.record --scenarios` take the folders as they
take the suite's.

    python -m sekft.scenarios.factory --families 30 --seeds 3 --split train --out DIR
    python -m sekft.scenarios.factory --show 17

The split is by family seed (`spec`): held-out families share no grammar, documentation or
work spec with any training family. The 12 hand-written families (`sekft.scenarios`) are a
second held-out set: never in factory training data.
"""

from __future__ import annotations

from pathlib import Path

from sekft.scenarios.factory.instance import build_instance
from sekft.scenarios.factory.spec import (
    FamilySpec,
    describe,
    family_seeds,
    family_spec,
    shares_no_spec_part,
    split_of,
)
from sekft.scenarios.world import Instance, write_scenario

__all__ = ["FamilySpec", "build", "describe", "family_seeds", "family_spec", "generate",
           "shares_no_spec_part", "split_of"]


def build(family_seed: int, seed: int, vocab: str = "open") -> Instance:
    """Instance `seed` of family `family_seed` (see `instance.build_instance`)."""
    return build_instance(family_spec(family_seed), seed, vocab)


def generate(family_seed: int, seed: int, out_dir: str | Path, vocab: str = "open") -> Path:
    """Write instance `seed` of family `family_seed` as a scenario folder under `out_dir`."""
    return write_scenario(build(family_seed, seed, vocab), out_dir)

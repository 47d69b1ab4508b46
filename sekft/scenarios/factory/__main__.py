"""Write scenario folders of factory families, or print a family's spec.

    python -m sekft.scenarios.factory --families 30 --seeds 3 --split train --out DIR
    python -m sekft.scenarios.factory --families 10 --seeds 2 --split heldout --out DIR
    python -m sekft.scenarios.factory --show 17
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sekft.errors import ConfigError, run_cli
from sekft.scenarios.factory import describe, family_seeds, family_spec, generate
from sekft.scenarios.factory.spec import HELDOUT_SHARE
from sekft.scenarios.factory.vocab import MODES, instance_vocab


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sekft.scenarios.factory", allow_abbrev=False,
                                description="Write scenario folders of generated families "
                                            "(each with its expert's episode in "
                                            "scenario.json meta), or print a family's spec.")
    p.add_argument("--show", type=int, metavar="FAMILY_SEED",
                   help="print the spec of family FAMILY_SEED and stop")
    p.add_argument("--families", type=int, help="how many families of the split")
    p.add_argument("--first-family", type=int, default=0,
                   help="take the split's families from this family seed on")
    p.add_argument("--seeds", type=int, help="instances per family")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--split", choices=("train", "heldout"),
                   help=f"train families, or the held-out ones (1 family seed in "
                        f"{HELDOUT_SHARE}: no grammar, docs or work spec of a training one)")
    p.add_argument("--vocab", choices=MODES, default="open",
                   help="open: invented names and numbers; closed: the closed word list the "
                        "tiny default base copies; mixed: open for even instance seeds, "
                        "closed for odd ones")
    p.add_argument("--out", type=Path, help="folder to write one scenario folder per instance")
    return p.parse_args(argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    if args.show is not None:
        print(describe(family_spec(args.show)))
        return 0
    if args.families is None or args.seeds is None or args.split is None or args.out is None:
        raise ConfigError("give --families, --seeds, --split and --out (or --show SEED)")
    if args.families <= 0 or args.seeds <= 0 or args.first_seed < 0 or args.first_family < 0:
        raise ConfigError("--families and --seeds must be positive, --first-family and "
                          "--first-seed not negative")
    families = family_seeds(args.split, args.families, args.first_family)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    written = [generate(f, s, args.out, instance_vocab(args.vocab, s))
               for f in families for s in seeds]
    print(f"wrote {len(written)} {args.split} scenarios of {len(families)} factory families "
          f"(family seeds {families[0]}..{families[-1]}, {args.vocab} vocabulary) to "
          f"{args.out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("sekft.scenarios.factory", _main, argv)


if __name__ == "__main__":
    sys.exit(main())

"""Write scenario folders of the built-in suite (for `sekft-eval --scenarios`), or print
the split.

    python -m sekft.scenarios --split heldout --seeds 5 --out data/heldout-scenarios
    python -m sekft.scenarios --show-split
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sekft.errors import ConfigError, run_cli
from sekft.scenarios import choose_families, describe_split, generate


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sekft.scenarios",
                                description="Write scenario folders of sekft's built-in "
                                            "families, or print the train/held-out split.")
    p.add_argument("--show-split", action="store_true", help="print the split and stop")
    p.add_argument("--split", choices=("train", "heldout"))
    p.add_argument("--seeds", type=int, help="seeds per family")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--families", default=None,
                   help="comma-separated subset of the split's families (default: all)")
    p.add_argument("--out", type=Path, help="folder to write one scenario folder per instance")
    return p.parse_args(argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    if args.show_split:
        print(describe_split())
        return 0
    if args.split is None or args.seeds is None or args.out is None:
        raise ConfigError("give --split, --seeds and --out (or --show-split)")
    if args.seeds <= 0 or args.first_seed < 0:
        raise ConfigError("--seeds must be positive and --first-seed not negative")
    families = choose_families(args.split, args.families)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    written = [generate(f, seed, args.out, args.split) for f in families for seed in seeds]
    print(f"wrote {len(written)} {args.split} scenarios of {len(families)} families to "
          f"{args.out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("sekft.scenarios", _main, argv)


if __name__ == "__main__":
    sys.exit(main())

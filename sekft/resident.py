"""Placeholder until its issue lands."""

import sys


def main(argv: list[str] | None = None) -> int:
    print("sekft-resident: not implemented yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

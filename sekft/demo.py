"""`make demo`: placeholder until the embedded default base and scenarios land."""

import sys


def main() -> int:
    print("sekft demo: the embedded default base is not built yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

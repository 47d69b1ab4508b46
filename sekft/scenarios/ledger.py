"""ledger: record a count of an item with the `ledger` tool (bash); directive in home or mail.

The ledger already holds a few entries; the new one must be added and the old ones kept.
"""

from __future__ import annotations

import random
from pathlib import Path

from sekft.scenarios.posts import pick, place
from sekft.scenarios.split import draw_for_split
from sekft.scenarios.world import Instance, expect_ending, output_is, tool_files, write_scenario

FAMILY = "ledger"
POSTS = ("home", "mail")
BOOK = "/usr/local/var/ledger/entries"
SCRIPT = r"""#!/bin/bash
book=/usr/local/var/ledger/entries
case "$1" in
  -h|--help)
    cat <<'EOF'
{help}
EOF
    ;;
  add)
    if [ $# -ne 3 ]; then echo "ledger: add needs ITEM and COUNT; see ledger --help" >&2; exit 2; fi
    case "$3" in *[!0-9]*|'') echo "ledger: COUNT must be a whole number" >&2; exit 2 ;; esac
    echo "$2 $3" >> "$book"
    echo "recorded: $2 $3"
    ;;
  list) cat "$book" ;;
  *) echo "ledger: unknown command '$1'; see ledger --help" >&2; exit 2 ;;
esac
"""
USAGE = [("ledger add ITEM COUNT", "record COUNT units of ITEM"),
         ("ledger list", "show every entry, one ITEM COUNT per line")]


def _make(rng: random.Random, seed: int, split: str) -> Instance:
    avoid: set[str] = set()
    item, *old = pick(rng, 4, avoid)
    count = rng.randint(2, 9)
    entries = "".join(f"{w} {rng.randint(2, 9)}\n" for w in old)
    directive = rng.choice([
        f"Please record {count} {item} in the ledger.",
        f"We received {count} boxes of {item}. Add them to the ledger.",
        f"Add {item} to the ledger with a count of {count}.",
    ])
    post = place(rng.choice(POSTS), rng, directive, avoid)
    files = {**post.files, **tool_files("ledger", SCRIPT, "keep counts of items", USAGE),
             "local/var/ledger/entries": entries.encode()}
    check = expect_ending("exit") + (
        f'[ "$(grep -cx "{item} {count}" {BOOK})" = 1 ] || fail "no single entry {item} {count}"\n'
        + output_is(f"head -n {len(old)} {BOOK}", entries.encode(), "the old entries changed")
    )
    return Instance(
        family=FAMILY, seed=seed, split=split, expect="exit",
        description=f"Record {count} {item} with the ledger tool (directive: {post.kind}).",
        files=files, setup="true\n", check=check,
        commands=(*post.commands, "ledger --help", f"ledger add {item} {count}", "ledger list",
                  "exit"),
        key=(item, count), executables=frozenset({"local/bin/ledger"}),
    )


def build(seed: int, split: str | None = None) -> Instance:
    """The ledger instance for `seed` in `split` (default train)."""
    return draw_for_split(FAMILY, seed, split, lambda rng, s: _make(rng, seed, s))


def generate(seed: int, out_dir: str | Path, split: str | None = None) -> Path:
    """Write the scenario folder for `seed` under `out_dir`; returns its path."""
    return write_scenario(build(seed, split), out_dir)

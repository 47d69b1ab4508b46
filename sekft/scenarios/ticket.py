"""ticket (held-out family): close the ticket about a word with the `ticket` tool (python),
which needs the ticket's number from `ticket list`; directive in home or the mail spool."""

from __future__ import annotations

import random
from pathlib import Path

from sekft.scenarios.posts import pick, place
from sekft.scenarios.split import draw_for_split
from sekft.scenarios.world import (
    Instance,
    expect_ending,
    output_is,
    text,
    tool_files,
    write_scenario,
)

FAMILY = "ticket"
POSTS = ("home", "mail")
DB = "/usr/local/var/ticket/tickets"
SCRIPT = r'''#!/usr/bin/python3
import sys

HELP = r"""{help}"""
DB = "/usr/local/var/ticket/tickets"


def load():
    with open(DB) as f:
        return [line.split() for line in f if line.strip()]


def main(args):
    if args[:1] in (["-h"], ["--help"]):
        print(HELP)
        return 0
    tickets = load()
    if args == ["list"]:
        for number, state, title in tickets:
            print(f"ticket {number} {state} {title}")
        return 0
    if args[:1] == ["close"] and len(args) == 2:
        wanted = args[1].lstrip("#")
        if wanted not in [number for number, _, _ in tickets]:
            print(f"ticket: no ticket {wanted}; see ticket list", file=sys.stderr)
            return 1
        with open(DB, "w") as f:
            for number, state, title in tickets:
                f.write(f"{number} {'closed' if number == wanted else state} {title}\n")
        print(f"closed ticket {wanted}")
        return 0
    print("ticket: unknown command; see ticket --help", file=sys.stderr)
    return 2


sys.exit(main(sys.argv[1:]))
'''
USAGE = [("ticket list", "show every ticket: number, state and title"),
         ("ticket close NUMBER", "close ticket NUMBER")]


def _make(rng: random.Random, seed: int, split: str) -> Instance:
    avoid: set[str] = set()
    titles = pick(rng, rng.randint(3, 5), avoid)
    numbers = rng.sample(range(1, 10), len(titles))
    target, number = titles[0], numbers[0]
    rows = sorted(zip(numbers, titles, strict=True))
    directive = rng.choice([
        f"The {target} ticket is fixed now; please close it.",
        f"Close the ticket about {target}, the work is done.",
    ])
    post = place(rng.choice(POSTS), rng, directive, avoid)
    files = {**post.files, **tool_files("ticket", SCRIPT, "track work tickets", USAGE),
             "local/var/ticket/tickets": text("\n".join(f"{n} open {t}" for n, t in rows))}
    after = text("\n".join(f"{n} {'closed' if n == number else 'open'} {t}" for n, t in rows))
    check = expect_ending("exit") + output_is(
        f"cat {DB}", after, f"ticket {number} ({target}) is not the only one closed")
    return Instance(
        family=FAMILY, seed=seed, split=split, expect="exit",
        description=f"Close ticket {number} about {target} (directive: {post.kind}).",
        files=files, setup="true\n", check=check,
        commands=(*post.commands, "ticket --help", "ticket list", f"ticket close {number}",
                  "exit"),
        key=(target, number), executables=frozenset({"local/bin/ticket"}),
    )


def build(seed: int, split: str | None = None) -> Instance:
    """The ticket instance for `seed` (always held-out)."""
    return draw_for_split(FAMILY, seed, split, lambda rng, s: _make(rng, seed, s))


def generate(seed: int, out_dir: str | Path, split: str | None = None) -> Path:
    """Write the scenario folder for `seed` under `out_dir`; returns its path."""
    return write_scenario(build(seed, split), out_dir)

"""lookup: find an item's shelf in a stock list and answer with `reply` (python); directive
in a hidden dotfile or a plain file in home.

The list is `item shelf` columns separated by a space, not commas, so the answer the model
copies stands after a space in the observation as it does in the command (one and the same
token in a byte-level BPE, where `,hawk` and ` hawk` are different ones).
"""

from __future__ import annotations

import random
from pathlib import Path

from sekft.scenarios.posts import apart, pick, place
from sekft.scenarios.split import draw_for_split
from sekft.scenarios.world import Instance, expect_ending, tool_files, write_scenario

FAMILY = "lookup"
POSTS = ("dotfile", "home")
ANSWER = "/usr/local/var/reply/answer"
SCRIPT = r'''#!/usr/bin/python3
import sys

HELP = r"""{help}"""
ANSWER = "/usr/local/var/reply/answer"


def main(args):
    if args[:1] in (["-h"], ["--help"]):
        print(HELP)
        return 0
    if len(args) != 1 or args[0].startswith("-"):
        print("reply: give exactly one ANSWER; see reply --help", file=sys.stderr)
        return 2
    with open(ANSWER, "w") as f:
        f.write(args[0] + "\n")
    print(f"answer recorded: {args[0]}")
    return 0


sys.exit(main(sys.argv[1:]))
'''
USAGE = [("reply ANSWER", "record ANSWER as the answer to the question you were asked")]


def _make(rng: random.Random, seed: int, split: str) -> Instance:
    avoid: set[str] = set()
    table, = pick(rng, 1, avoid)
    size = rng.randint(4, 6)
    # One draw for both columns: no item may be part of a shelf either, or grep finds two rows.
    words = apart(rng, 2 * size, avoid)
    rows = list(zip(words[:size], words[size:], strict=True))
    target, answer = rows[0]
    rng.shuffle(rows)
    stock = "item shelf\n" + "".join(f"{item} {shelf}\n" for item, shelf in rows)
    directive = rng.choice([
        f"Which shelf is the {target} on? Look it up in data/{table}.txt and answer with reply.",
        f"Find the shelf of {target} in data/{table}.txt, then tell me with the reply tool.",
    ])
    post = place(rng.choice(POSTS), rng, directive, avoid)
    files = {**post.files, **tool_files("reply", SCRIPT, "answer a question", USAGE),
             f"home/data/{table}.txt": stock.encode()}
    check = expect_ending("exit") + (
        f'[ "$(cat {ANSWER})" = {answer} ] || fail "answered $(cat {ANSWER}), expected {answer}"\n'
    )
    return Instance(
        family=FAMILY, seed=seed, split=split, expect="exit",
        description=f"Look up the shelf of {target} in data/{table}.txt ({answer}) and reply "
                    f"(directive: {post.kind}).",
        files=files, setup="mkdir -p /usr/local/var/reply\n", check=check,
        commands=(*post.commands, "reply --help", f"grep {target} data/{table}.txt",
                  f"reply {answer}", "exit"),
        key=(table, target, answer), executables=frozenset({"local/bin/reply"}),
    )


def build(seed: int, split: str | None = None) -> Instance:
    """The lookup instance for `seed` in `split` (default train)."""
    return draw_for_split(FAMILY, seed, split, lambda rng, s: _make(rng, seed, s))


def generate(seed: int, out_dir: str | Path, split: str | None = None) -> Path:
    """Write the scenario folder for `seed` under `out_dir`; returns its path."""
    return write_scenario(build(seed, split), out_dir)

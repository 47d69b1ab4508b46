"""stash: put one named file from ~/docs into the `stash` store (python); directive in a
hidden dotfile or behind the motd. The other files must stay out of the stash."""

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

FAMILY = "stash"
POSTS = ("dotfile", "motd")
STORE = "/usr/local/var/stash"
SCRIPT = r'''#!/usr/bin/python3
import os
import shutil
import sys

HELP = r"""{help}"""
STORE = "/usr/local/var/stash"


def main(args):
    if args[:1] in (["-h"], ["--help"]):
        print(HELP)
        return 0
    if args[:1] == ["ls"] and len(args) == 1:
        for name in sorted(os.listdir(STORE)):
            print(name)
        return 0
    if args[:1] == ["put"] and len(args) == 2:
        if not os.path.isfile(args[1]):
            print(f"stash: {args[1]}: no such file", file=sys.stderr)
            return 1
        shutil.copyfile(args[1], os.path.join(STORE, os.path.basename(args[1])))
        print(f"stashed {os.path.basename(args[1])}")
        return 0
    print("stash: unknown command; see stash --help", file=sys.stderr)
    return 2


sys.exit(main(sys.argv[1:]))
'''
USAGE = [("stash put FILE", "keep a copy of FILE in the stash"),
         ("stash ls", "list the files in the stash")]


def _make(rng: random.Random, seed: int, split: str) -> Instance:
    avoid: set[str] = set()
    names = pick(rng, 4, avoid)
    target = names[0]
    docs = {name: text(" ".join(pick(rng, 5, set()))) for name in names}
    directive = rng.choice([
        f"Please put docs/{target}.txt into the stash.",
        f"The file docs/{target}.txt has to go into the stash.",
        f"Stash docs/{target}.txt for me, nothing else.",
    ])
    post = place(rng.choice(POSTS), rng, directive, avoid)
    files = {**post.files, **tool_files("stash", SCRIPT, "keep copies of files", USAGE),
             **{f"home/docs/{name}.txt": body for name, body in sorted(docs.items())}}
    check = expect_ending("exit") + output_is(
        f"cat {STORE}/{target}.txt", docs[target], f"{target}.txt is not in the stash as it was"
    ) + output_is(f"ls {STORE}", text(f"{target}.txt"), "the stash holds other files too")
    return Instance(
        family=FAMILY, seed=seed, split=split, expect="exit",
        description=f"Stash docs/{target}.txt (directive: {post.kind}).",
        files=files, setup=f"mkdir -p {STORE}\n", check=check,
        commands=(*post.commands, "stash --help", f"stash put docs/{target}.txt", "stash ls",
                  "exit"),
        key=(target,), executables=frozenset({"local/bin/stash"}),
    )


def build(seed: int, split: str | None = None) -> Instance:
    """The stash instance for `seed` in `split` (default train)."""
    return draw_for_split(FAMILY, seed, split, lambda rng, s: _make(rng, seed, s))


def generate(seed: int, out_dir: str | Path, split: str | None = None) -> Path:
    """Write the scenario folder for `seed` under `out_dir`; returns its path."""
    return write_scenario(build(seed, split), out_dir)

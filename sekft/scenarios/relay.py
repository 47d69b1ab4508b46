"""relay: send a report to a named person with the `relay` tool (python); directive in a
hidden dotfile or inside an archive."""

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

FAMILY = "relay"
POSTS = ("dotfile", "archive")
OUTBOX = "/usr/local/var/relay/outbox"
SCRIPT = r'''#!/usr/bin/python3
import os
import shutil
import sys

HELP = r"""{help}"""
OUTBOX = "/usr/local/var/relay/outbox"


def main(args):
    if args[:1] in (["-h"], ["--help"]):
        print(HELP)
        return 0
    if args == ["outbox"]:
        for person in sorted(os.listdir(OUTBOX)):
            for name in sorted(os.listdir(os.path.join(OUTBOX, person))):
                print(f"{person}: {name}")
        return 0
    if args[:1] == ["send"] and len(args) == 3:
        person, path = args[1], args[2]
        if not os.path.isfile(path):
            print(f"relay: {path}: no such file", file=sys.stderr)
            return 1
        os.makedirs(os.path.join(OUTBOX, person), exist_ok=True)
        shutil.copyfile(path, os.path.join(OUTBOX, person, os.path.basename(path)))
        print(f"sent {os.path.basename(path)} to {person}")
        return 0
    print("relay: unknown command; see relay --help", file=sys.stderr)
    return 2


sys.exit(main(sys.argv[1:]))
'''
USAGE = [("relay send PERSON FILE", "send a copy of FILE to PERSON"),
         ("relay outbox", "list what has been sent, to whom")]


def _make(rng: random.Random, seed: int, split: str) -> Instance:
    avoid: set[str] = set()
    person, *names = pick(rng, rng.randint(4, 5), avoid)
    target = names[0]
    reports = {name: text(" ".join(pick(rng, 6, set()))) for name in names}
    directive = rng.choice([
        f"Send reports/{target}.txt to {person}.",
        f"Please relay reports/{target}.txt to {person}, who is waiting for it.",
        f"Use relay to get reports/{target}.txt to {person}.",
    ])
    post = place(rng.choice(POSTS), rng, directive, avoid)
    files = {**post.files, **tool_files("relay", SCRIPT, "send files to people", USAGE),
             **{f"home/reports/{name}.txt": body for name, body in sorted(reports.items())}}
    check = expect_ending("exit") + output_is(
        f"cat {OUTBOX}/{person}/{target}.txt", reports[target],
        f"{person} did not get {target}.txt",
    ) + output_is(f"ls -R {OUTBOX}", text(f"{OUTBOX}:\n{person}\n\n{OUTBOX}/{person}:\n"
                                          f"{target}.txt"), "other files were sent too")
    return Instance(
        family=FAMILY, seed=seed, split=split, expect="exit",
        description=f"Send reports/{target}.txt to {person} (directive: {post.kind}).",
        files=files, setup=f"mkdir -p {OUTBOX}\n", check=check,
        commands=(*post.commands, "relay --help", f"relay send {person} reports/{target}.txt",
                  "exit"),
        key=(person, target), executables=frozenset({"local/bin/relay"}),
    )


def build(seed: int, split: str | None = None) -> Instance:
    """The relay instance for `seed` in `split` (default train)."""
    return draw_for_split(FAMILY, seed, split, lambda rng, s: _make(rng, seed, s))


def generate(seed: int, out_dir: str | Path, split: str | None = None) -> Path:
    """Write the scenario folder for `seed` under `out_dir`; returns its path."""
    return write_scenario(build(seed, split), out_dir)

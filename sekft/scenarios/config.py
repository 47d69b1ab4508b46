"""config: change one setting with the `conf` tool (python), leaving the others alone;
directive behind the motd or in the mail spool."""

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

FAMILY = "config"
POSTS = ("motd", "mail")
SETTINGS = "/usr/local/etc/conf/settings"
SCRIPT = r'''#!/usr/bin/python3
import sys

HELP = r"""{help}"""
SETTINGS = "/usr/local/etc/conf/settings"


def load():
    with open(SETTINGS) as f:
        return dict(line.rstrip("\n").split(" = ", 1) for line in f if " = " in line)


def main(args):
    if args[:1] in (["-h"], ["--help"]):
        print(HELP)
        return 0
    settings = load()
    if args == ["show"]:
        for name, value in settings.items():
            print(f"{name} = {value}")
        return 0
    if args[:1] == ["get"] and len(args) == 2 and args[1] in settings:
        print(settings[args[1]])
        return 0
    if args[:1] == ["set"] and len(args) == 3:
        if args[1] not in settings:
            print(f"conf: no setting named {args[1]}; see conf show", file=sys.stderr)
            return 1
        settings[args[1]] = args[2]
        with open(SETTINGS, "w") as f:
            f.writelines(f"{name} = {value}\n" for name, value in settings.items())
        print(f"{args[1]} = {args[2]}")
        return 0
    print("conf: unknown command; see conf --help", file=sys.stderr)
    return 2


sys.exit(main(sys.argv[1:]))
'''
USAGE = [("conf show", "list every setting and its value"),
         ("conf get NAME", "print the value of setting NAME"),
         ("conf set NAME VALUE", "change setting NAME to VALUE")]


def _make(rng: random.Random, seed: int, split: str) -> Instance:
    avoid: set[str] = set()
    names = pick(rng, rng.randint(3, 5), avoid)
    values = pick(rng, len(names), avoid)
    target = rng.choice(names)
    new, = pick(rng, 1, avoid)
    before = "".join(f"{n} = {v}\n" for n, v in zip(names, values, strict=True))
    after = "".join(f"{n} = {new if n == target else v}\n"
                    for n, v in zip(names, values, strict=True))
    directive = rng.choice([
        f"Set {target} to {new} with the conf tool.",
        f"Please change the {target} setting to {new}.",
        f"The {target} setting should be {new} from now on.",
    ])
    post = place(rng.choice(POSTS), rng, directive, avoid)
    files = {**post.files, **tool_files("conf", SCRIPT, "read and change settings", USAGE),
             "local/etc/conf/settings": text(before)}
    check = expect_ending("exit") + output_is(
        f"cat {SETTINGS}", after.encode(), f"settings are not the old ones with {target} = {new}")
    return Instance(
        family=FAMILY, seed=seed, split=split, expect="exit",
        description=f"Set {target} = {new} with conf (directive: {post.kind}).",
        files=files, setup="true\n", check=check,
        commands=(*post.commands, "conf --help", "conf show", f"conf set {target} {new}",
                  "exit"),
        key=(target, new), executables=frozenset({"local/bin/conf"}),
    )


def build(seed: int, split: str | None = None) -> Instance:
    """The config instance for `seed` in `split` (default train)."""
    return draw_for_split(FAMILY, seed, split, lambda rng, s: _make(rng, seed, s))


def generate(seed: int, out_dir: str | Path, split: str | None = None) -> Path:
    """Write the scenario folder for `seed` under `out_dir`; returns its path."""
    return write_scenario(build(seed, split), out_dir)

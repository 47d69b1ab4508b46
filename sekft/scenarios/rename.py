"""rename: rename a file in ~/inbox, then tell the team with `notify` (bash); directive in
the mail spool or behind the motd."""

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

FAMILY = "rename"
POSTS = ("mail", "motd")
LOG = "/usr/local/var/notify/log"
SCRIPT = r"""#!/bin/bash
log=/usr/local/var/notify/log
case "$1" in
  -h|--help)
    cat <<'EOF'
{help}
EOF
    ;;
  ''|-*) echo "notify: give the FILE that is ready; see notify --help" >&2; exit 2 ;;
  *)
    if [ ! -f "$1" ]; then echo "notify: $1: no such file" >&2; exit 1; fi
    echo "${1##*/}" >> "$log" && echo "the team knows that ${1##*/} is ready"
    ;;
esac
"""
USAGE = [("notify FILE", "tell the team that FILE is ready")]


def _make(rng: random.Random, seed: int, split: str) -> Instance:
    avoid: set[str] = set()
    old, new, *others = pick(rng, rng.randint(4, 5), avoid)
    inbox = {name: text(" ".join(pick(rng, 4, set()))) for name in [old, *others]}
    directive = rng.choice([
        f"Rename inbox/{old}.txt to inbox/{new}.txt, then tell the team with notify.",
        f"Please move inbox/{old}.txt to inbox/{new}.txt and notify the team when done.",
    ])
    post = place(rng.choice(POSTS), rng, directive, avoid)
    files = {**post.files, **tool_files("notify", SCRIPT, "tell the team a file is ready", USAGE),
             **{f"home/inbox/{name}.txt": body for name, body in sorted(inbox.items())}}
    check = expect_ending("exit") + output_is(
        f"cat inbox/{new}.txt", inbox[old], f"inbox/{new}.txt does not hold the old content"
    ) + (
        f'[ ! -e inbox/{old}.txt ] || fail "inbox/{old}.txt is still there"\n'
        f'grep -qx {new}.txt {LOG} || fail "the team was not notified about {new}.txt"\n'
    )
    return Instance(
        family=FAMILY, seed=seed, split=split, expect="exit",
        description=f"Rename inbox/{old}.txt to {new}.txt and notify (directive: {post.kind}).",
        files=files, setup="mkdir -p /usr/local/var/notify\n", check=check,
        commands=(*post.commands, "ls inbox", f"mv inbox/{old}.txt inbox/{new}.txt",
                  "notify --help", f"notify inbox/{new}.txt", "exit"),
        key=(old, new), executables=frozenset({"local/bin/notify"}),
    )


def build(seed: int, split: str | None = None) -> Instance:
    """The rename instance for `seed` in `split` (default train)."""
    return draw_for_split(FAMILY, seed, split, lambda rng, s: _make(rng, seed, s))


def generate(seed: int, out_dir: str | Path, split: str | None = None) -> Path:
    """Write the scenario folder for `seed` under `out_dir`; returns its path."""
    return write_scenario(build(seed, split), out_dir)

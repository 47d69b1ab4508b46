"""unpack: take one file out of a tarball and hand it over with `deliver` (bash); directive
in home, a hidden dotfile, behind the motd or in the mail spool."""

from __future__ import annotations

import random
from pathlib import Path

from sekft.scenarios.posts import pick, place
from sekft.scenarios.split import draw_for_split
from sekft.scenarios.world import (
    Instance,
    expect_ending,
    output_is,
    targz,
    text,
    tool_files,
    write_scenario,
)

FAMILY = "unpack"
POSTS = ("home", "dotfile", "motd", "mail")
DROP = "/usr/local/var/deliver"
SCRIPT = r"""#!/bin/bash
drop=/usr/local/var/deliver
case "$1" in
  -h|--help)
    cat <<'EOF'
{help}
EOF
    ;;
  ''|-*) echo "deliver: give the FILE to deliver; see deliver --help" >&2; exit 2 ;;
  *)
    if [ ! -f "$1" ]; then echo "deliver: $1: no such file" >&2; exit 1; fi
    cp "$1" "$drop/${1##*/}" && echo "delivered ${1##*/}"
    ;;
esac
"""
USAGE = [("deliver FILE", "hand FILE over to the office (a copy; FILE stays where it is)")]


def _make(rng: random.Random, seed: int, split: str) -> Instance:
    avoid: set[str] = set()
    bundle, *names = pick(rng, rng.randint(4, 5), avoid)
    target = names[0]
    members = {f"{bundle}/{name}.txt": text(" ".join(rng.sample(names, 2))) for name in names}
    directive = rng.choice([
        f"The bundle {bundle}.tar.gz has a file {target}.txt. Take it out and deliver it.",
        f"Unpack {bundle}.tar.gz and hand over {target}.txt with the deliver tool.",
    ])
    post = place(rng.choice(POSTS), rng, directive, avoid)
    files = {**post.files, **tool_files("deliver", SCRIPT, "hand files over", USAGE),
             f"home/{bundle}.tar.gz": targz(members)}
    check = expect_ending("exit") + output_is(
        f"cat {DROP}/{target}.txt", members[f"{bundle}/{target}.txt"],
        f"{target}.txt was not delivered as packed",
    ) + output_is(f"ls {DROP}", text(f"{target}.txt"), "other files were delivered too")
    return Instance(
        family=FAMILY, seed=seed, split=split, expect="exit",
        description=f"Extract {target}.txt from {bundle}.tar.gz and deliver it "
                    f"(directive: {post.kind}).",
        files=files, setup=f"mkdir -p {DROP}\n", check=check,
        commands=(*post.commands, "deliver --help", f"tar xzvf {bundle}.tar.gz",
                  f"deliver {bundle}/{target}.txt", "exit"),
        key=(bundle, target), executables=frozenset({"local/bin/deliver"}),
    )


def build(seed: int, split: str | None = None) -> Instance:
    """The unpack instance for `seed` in `split` (default train)."""
    return draw_for_split(FAMILY, seed, split, lambda rng, s: _make(rng, seed, s))


def generate(seed: int, out_dir: str | Path, split: str | None = None) -> Path:
    """Write the scenario folder for `seed` under `out_dir`; returns its path."""
    return write_scenario(build(seed, split), out_dir)

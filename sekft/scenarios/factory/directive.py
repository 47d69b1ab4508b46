"""Where a factory instance's directive lives, and the commands that find it.

Five places come from the built-in suite (`sekft.scenarios.posts`): a home file, the mail
spool, the motd, a tarball, and a hidden file named by another file ("pointer"). Two are
the factory's own:

    hidden    a dotfile nothing points to          ls; ls -a; cat .maple
    nested    a file deep in a folder tree         ls; find projects -type f; cat projects/...
"""

from __future__ import annotations

import random

from sekft.scenarios.posts import Placement, pick, place
from sekft.scenarios.world import text

BUILT_IN = {"home": "home", "mail": "mail", "motd": "motd", "archive": "archive",
            "pointer": "dotfile"}


def post(kind: str, rng: random.Random, directive: str, avoid: set[str]) -> Placement:
    """Put `directive` at a place of `kind` (see `spec.POSTS`); `avoid` as in `posts.pick`."""
    if kind in BUILT_IN:
        placed = place(BUILT_IN[kind], rng, directive, avoid)
        return Placement(kind, placed.files, placed.commands)
    host, name, other = pick(rng, 3, avoid)
    welcome = rng.choice([f"Welcome to {host}.", f"{host}: Debian GNU/Linux 12"])
    if kind == "hidden":
        hint = rng.choice(["", "\nNot everything here is in plain sight.",
                           "\nSome notes are kept out of sight."])
        return Placement(kind, {"motd": text(welcome + hint), f"home/.{name}": text(directive),
                                f"home/{other}.txt": text(" ".join(pick(rng, 4, set())))},
                         ("ls", "ls -a", f"cat .{name}"))
    if kind == "nested":
        leaf = rng.choice(["TODO", "task.txt", "orders"])
        path = f"projects/{name}/{rng.choice(['notes', 'docs', 'admin'])}/{leaf}"
        return Placement(kind, {"motd": text(welcome), f"home/{path}": text(directive),
                                f"home/projects/{other}/README": text(
                                    " ".join(pick(rng, 5, set())))},
                         ("ls", "find projects -type f", f"cat {path}"))
    raise ValueError(f"unknown directive place {kind!r}")

"""Where a directive lives in the world, and the commands that find it.

The model lands with no imperative: the login banner says at most where to look. A post
puts a family's directive text somewhere to be found and returns the discovery commands an
expert runs to get it on screen:

    home      a plain file in home               ls; cat TODO
    dotfile   a hidden file named by another     ls; cat README; cat .maple
    motd      the banner points to a file        cat ~/orders/maple.txt
    mail      the mail spool ("You have mail")   cat $MAIL
    archive   a note inside a tarball            ls; cat README; tar xzvf maple.tar.gz; cat ...
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from sekft.scenarios.words import WORDS
from sekft.scenarios.world import targz, text

POSTS = ("home", "dotfile", "motd", "mail", "archive")


@dataclass(frozen=True)
class Placement:
    """The files a post of `kind` adds to the world (including "motd"), and the discovery
    commands that end with the directive on screen."""

    kind: str
    files: dict[str, bytes]
    commands: tuple[str, ...]


def pick(rng: random.Random, n: int, avoid: set[str]) -> list[str]:
    """`n` distinct words from WORDS, none in `avoid` (which is updated with them)."""
    chosen = rng.sample([w for w in WORDS if w not in avoid], n)
    avoid.update(chosen)
    return chosen


def apart(rng: random.Random, n: int, avoid: set[str]) -> list[str]:
    """`n` words of which none is part of another (so `grep WORD` finds only that word)."""
    pool = [w for w in WORDS if w not in avoid]
    rng.shuffle(pool)
    chosen: list[str] = []
    for word in pool:
        if all(word not in other and other not in word for other in chosen):
            chosen.append(word)
        if len(chosen) == n:
            break
    avoid.update(chosen)
    return chosen


def place(post: str, rng: random.Random, directive: str, avoid: set[str]) -> Placement:
    """Put `directive` (plain text) into the world at a `post` of kind POSTS.

    Words the post invents (host, sender, file names) are drawn from WORDS outside `avoid`.
    """
    host, sender, name = pick(rng, 3, avoid)
    welcome = rng.choice([f"Welcome to {host}.", f"{host}: Debian GNU/Linux 12",
                          f"Welcome to {host} (Debian GNU/Linux 12)."])
    greeting = rng.choice(["", "Hi,\n\n", "Hello,\n\n"])
    signoff = rng.choice([f"\n\n-- {sender}", f"\n\nThanks,\n{sender}", ""])
    letter = greeting + directive + signoff
    if post == "home":
        todo = rng.choice(["TODO", "NOTES", "tasks.txt", "README"])
        return Placement(post, {"motd": text(welcome), f"home/{todo}": text(letter)},
                         ("ls", f"cat {todo}"))
    if post == "dotfile":
        pointer = rng.choice(["README", "NOTE", "START-HERE"])
        line = rng.choice([f"My notes are in ~/.{name}", f"Read ~/.{name} for today's work.",
                           f"The task is written down in the hidden file .{name}"])
        return Placement(post, {"motd": text(welcome), f"home/{pointer}": text(line),
                          f"home/.{name}": text(letter)},
                         ("ls", f"cat {pointer}", f"cat .{name}"))
    if post == "motd":
        path = f"~/orders/{name}.txt"
        line = rng.choice([f"Today's work order is in {path}", f"Orders: {path}",
                           f"Please read {path} first."])
        return Placement(post, {"motd": text(f"{welcome}\n{line}"),
                          f"home/orders/{name}.txt": text(letter)},
                         (f"cat {path}",))
    if post == "mail":
        subject = rng.choice(["Work for today", "A small job", "Task", "Request"])
        spool = (f"From {sender}@{host} Mon Nov 23 08:00:00 2026\n"
                 f"From: {sender}@{host}\nTo: user@{host}\nSubject: {subject}\n\n{letter}\n")
        return Placement(post, {"motd": text(f"{welcome}\nYou have new mail."),
                          "mail/user": text(spool)},
                         ("cat $MAIL",))
    if post == "archive":
        pointer = rng.choice(["README", "NOTE"])
        inner = rng.choice(["TASK", "orders.txt", "note.txt"])
        line = rng.choice([f"Your briefing is packed in {name}.tar.gz",
                           f"Everything you need is inside {name}.tar.gz"])
        tarball = targz({f"{name}/{inner}": text(letter)})
        return Placement(post, {"motd": text(welcome), f"home/{pointer}": text(line),
                          f"home/{name}.tar.gz": tarball},
                         ("ls", f"cat {pointer}", f"tar xzvf {name}.tar.gz",
                          f"cat {name}/{inner}"))
    raise ValueError(f"unknown post {post!r}; expected one of {POSTS}")

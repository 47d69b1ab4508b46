"""The work a directive asks for, one builder per kind; each variant is one way of doing it.

    record     look a value up (cat a table, a `key: value` file, or grep a long one) and
               record it with the provider
    count      count lines mentioning a word (grep -c, or grep | wc -l) or files in a folder
               (ls | wc -l), and submit the count
    lines      write a file with exact lines (printf or echo with > and >>, into a folder
               that may need creating), and hand it in
    copy, move, rename   cp or mv a file as told, and register the result
    transform  sort, sed, awk or sort -u a file into another (a redirect), and hand it in
    send       send a file to a person named in the directive, given as an address, or
               looked up in team.txt

A builder returns a `Job`: the directive's text, the world files it needs, the commands
before the provider's call, the call's values by field role, and what check.sh must find.
The provider's part (grammar, state file, ending) is added by `instance`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from sekft.scenarios.factory.vocab import Vocab
from sekft.scenarios.world import output_is, text

STATUSES = ("ok", "late", "sent", "held", "lost")


@dataclass(frozen=True)
class Job:
    """One instance's work, before the provider's grammar is applied.

    `values` maps a field role (spec.FIELDS) to what is typed for it (a file: its path
    from home). `producer`, when set, is a command whose output is the last field's value
    (it can be piped into a stdin provider). `stored` is the contents the provider must
    keep (file fields). `needs` are home paths the directive names that the world must
    hold. `glued` are names the expert types right after `=` in a keyvalue grammar, which
    the directive then also shows in quotes (see `expert.unseen_words`).
    """

    directive: str
    files: dict[str, bytes]
    before: tuple[str, ...]
    values: dict[str, str]
    key: tuple
    producer: str | None = None
    stored: bytes | None = None
    check: str = ""
    setup: str = ""
    needs: tuple[str, ...] = ()
    glued: tuple[str, ...] = ()


def _numbers(v: Vocab, n: int) -> list[int]:
    seen: list[int] = []
    while len(seen) < n:
        x = v.number(2, 9 if n < 8 else 40)
        if x not in seen:
            seen.append(x)
    return seen


def record(rng: random.Random, v: Vocab, variant: str, tool: str) -> Job:
    table = v.name()
    keys = v.names(rng.randint(9, 14) if variant == "grep" else rng.randint(3, 6))
    numbers = _numbers(v, len(keys))
    key, value = keys[0], numbers[0]
    pairs = list(zip(keys, numbers, strict=True))
    rng.shuffle(pairs)
    sep = ": " if variant == "colon" else " "
    path = f"data/{table}.txt"
    read = f"grep {key} {path}" if variant == "grep" else f"cat {path}"
    directive = rng.choice([
        f"Look up {key} in {path} and record its value with {tool}.",
        f"Record the value of {key} (it is in {path}) using {tool}.",
        f"{path} lists values by name. Put the one for {key} into {tool}.",
    ])
    return Job(directive=directive, files={f"home/{path}": text(
        "\n".join(f"{k}{sep}{n}" for k, n in pairs))},
        before=(read,), values={"key": key, "value": str(value)}, key=(table, key, value),
        needs=(path,), glued=(key,))


def count(rng: random.Random, v: Vocab, variant: str, tool: str) -> Job:
    if variant == "ls-wc":
        folder = v.name()
        n = rng.randint(2, 9)
        files = {f"home/inbox/{folder}/{name}.txt": text(name) for name in v.names(n)}
        files.update({f"home/inbox/{other}/{v.name()}.txt": text("x") for other in v.names(1)})
        directive = rng.choice([
            f"Count the files in inbox/{folder} and report the total for {folder} with {tool}.",
            f"How many files are in inbox/{folder}? Submit the number for {folder} to {tool}.",
        ])
        return Job(directive=directive, files=files, before=(), key=(folder, n),
                   values={"key": folder, "count": str(n)},
                   producer=f"ls inbox/{folder} | wc -l", needs=(f"inbox/{folder}/",),
                   glued=(folder,))
    log = v.name()
    word, *others = v.names(4)
    layout = rng.choice(["{w} {s}", "{s}: {w}", "{s} {w} {n}"])
    hits = rng.randint(2, 9)
    rows = [word] * hits + [rng.choice(others) for _ in range(rng.randint(4, 10))]
    rng.shuffle(rows)
    lines = [layout.format(w=w, s=rng.choice(STATUSES), n=rng.randint(10, 99)) for w in rows]
    total = sum(word in line for line in lines)
    path = f"logs/{log}.log"
    producer = (f"grep -c {word} {path}" if variant == "grep-c"
                else f"grep {word} {path} | wc -l")
    directive = rng.choice([
        f"How many lines of {path} mention {word}? Report the number for {word} with {tool}.",
        f"Count the lines in {path} that mention {word} and submit the count for {word} "
        f"to {tool}.",
    ])
    return Job(directive=directive, files={f"home/{path}": text("\n".join(lines))}, before=(),
               values={"key": word, "count": str(total)}, producer=producer,
               key=(log, word, total), needs=(path,), glued=(word,))


def lines(rng: random.Random, v: Vocab, variant: str, tool: str) -> Job:
    name = v.name()
    n = 3 if variant == "echo" else rng.randint(2, 3)
    rows = [f"{w} {x}" for w, x in zip(v.names(n), _numbers(v, n), strict=True)]
    folder = f"reports/{v.name()}" if variant == "mkdir" else "out"
    path = f"{folder}/{name}.txt"
    if variant == "echo":
        writes = tuple(f"echo '{row}' {'>' if i == 0 else '>>'} {path}"
                       for i, row in enumerate(rows))
    else:
        writes = ("printf '%s\\n' " + " ".join(f"'{row}'" for row in rows) + f" > {path}",)
    if variant == "mkdir":
        writes = (f"mkdir -p {folder}", *writes)
    content = text("\n".join(rows))
    directive = (rng.choice([f"Write the file {path} with exactly these {n} lines:",
                             f"Create {path} containing exactly the {n} lines below:"])
                 + "\n\n" + "\n".join(rows) + "\n\n"
                 + rng.choice([f"Then hand it in with {tool}.", f"Hand it in to {tool} after."]))
    return Job(directive=directive, files={}, before=writes, values={"file": path},
               key=(name, *rows), stored=content, setup='mkdir -p "$HOME/out"\n',
               check=output_is(f'cat "$HOME/{path}"', content, f"{path} is not the lines asked"))


FILE_OPS = {
    "copy": {"into-folder": ("cp", "docs", "backup", False),
             "new-name": ("cp", "docs", "docs", True),
             "from-folder": ("cp", "shared/{x}", ".", False)},
    "move": {"into-folder": ("mv", "inbox", "archive", False),
             "up": ("mv", "inbox/{x}", ".", False),
             "renamed": ("mv", "docs", "archive", True)},
    "rename": {"same-folder": ("mv", "docs", "docs", True),
               "home": ("mv", ".", ".", True),
               "nested": ("mv", "work/{x}", "work/{x}", True)},
}


def _in(folder: str, name: str) -> str:
    return name if folder == "." else f"{folder}/{name}"


def file_op(kind: str) -> Callable[[random.Random, Vocab, str, str], Job]:
    """The builder of copy, move or rename."""

    def build(rng: random.Random, v: Vocab, variant: str, tool: str) -> Job:
        op, src_dir, dst_dir, renamed = FILE_OPS[kind][variant]
        sub = v.name()
        src_dir, dst_dir = src_dir.format(x=sub), dst_dir.format(x=sub)
        name, new, *others = v.names(4)
        src, dst = _in(src_dir, f"{name}.txt"), _in(dst_dir, f"{new if renamed else name}.txt")
        content = text(" ".join(v.names(3)))
        files = {f"home/{src}": content,
                 **{f"home/{_in(src_dir, o)}.txt": text(o) for o in others}}
        verb = {"copy": "Copy", "move": "Move", "rename": "Rename"}[kind]
        directive = rng.choice([
            f"{verb} {src} to {dst}, then register {dst} with {tool}.",
            f"Please {verb.lower()} {src} to {dst} and register the result with {tool}.",
        ])
        check = output_is(f'cat "$HOME/{dst}"', content, f"{dst} is not {src}'s contents")
        if op == "mv":
            check += f'[ ! -e "$HOME/{src}" ] || fail "{src} is still there"\n'
        else:
            check += output_is(f'cat "$HOME/{src}"', content, f"{src} changed")
        setup = f'mkdir -p "$HOME/{dst_dir}"\n' if dst_dir != "." else ""
        return Job(directive=directive, files=files, before=(f"{op} {src} {dst}",),
                   values={"file": dst}, key=(kind, src, dst), stored=content, check=check,
                   setup=setup, needs=(src,))

    return build


def transform(rng: random.Random, v: Vocab, variant: str, tool: str) -> Job:
    source, target = v.names(2)
    src, dst = f"data/{source}.txt", f"data/{target}.txt"
    words = v.names(rng.randint(4, 6))
    rows = [f"{w} {n}" for w, n in zip(words, _numbers(v, len(words)), strict=True)]
    if variant == "sed":
        old, new = words[0], v.name()
        rows += [f"{old} {n}" for n in _numbers(v, 2)]
        rng.shuffle(rows)
        result = [row.replace(old, new) for row in rows]
        command = f"sed 's/{old}/{new}/g' {src} > {dst}"
        ask = f'replace every "{old}" in {src} with "{new}"'
    elif variant == "awk":
        rng.shuffle(rows)
        result = [row.split()[1] for row in rows]
        command = f"awk '{{print $2}}' {src} > {dst}"
        ask = f"take column 2 (the numbers) of {src}, one per line"
    else:
        if variant == "sort-u":
            rows += rng.sample(rows, 2)
        rng.shuffle(rows)
        while rows == sorted(rows):
            rng.shuffle(rows)
        result = sorted(set(rows)) if variant == "sort-u" else sorted(rows)
        command = f"sort {'-u ' if variant == 'sort-u' else ''}{src} > {dst}"
        ask = f"sort the lines of {src}" + (", keeping each line only once"
                                            if variant == "sort-u" else "")
    content = text("\n".join(result))
    directive = rng.choice([
        f"Please {ask}, save the result as {dst} and hand that file in with {tool}.",
        f"Task: {ask}. The result goes to {dst}; hand it in to {tool}.",
    ])
    return Job(directive=directive, files={f"home/{src}": text("\n".join(rows))},
               before=(command,), values={"file": dst}, key=(variant, source, target),
               stored=content, needs=(src,),
               check=output_is(f'cat "$HOME/{dst}"', content, f"{dst} is not the result asked"))


def send(rng: random.Random, v: Vocab, variant: str, tool: str) -> Job:
    name, person, *others = v.names(4)
    path = f"reports/{name}.txt"
    content = text(" ".join(v.names(4)))
    files = {f"home/{path}": content, **{f"home/reports/{o}.txt": text(o) for o in others}}
    before: tuple[str, ...] = ()
    glued: tuple[str, ...] = (person,)
    if variant == "named":
        directive = rng.choice([f"Send {path} to {person} with {tool}.",
                                f"Hand {path} to {person}, who needs it; use {tool}."])
    elif variant == "address":
        domain = v.name()
        directive = rng.choice([f"Mail {path} to {person}@{domain}.org using {tool}.",
                                f"Please get {path} to {person}@{domain}.org ({tool} sends "
                                "files to local user names)."])
    else:
        project, *projects = v.names(3)
        owners = [person, *v.names(2)]
        team = [f"{p}: {o} <{o}@example.org>" for p, o in zip([project, *projects], owners,
                                                              strict=True)]
        rng.shuffle(team)
        files["home/team.txt"] = text("\n".join(team))
        directive = rng.choice([
            f"Send {path} to whoever owns the {project} project (see team.txt), using {tool}.",
            f"The owner of {project} wants {path}. team.txt says who that is; send it with "
            f"{tool}.",
        ])
        before, glued = ("cat team.txt",), ()
    return Job(directive=directive, files=files, before=before,
               values={"person": person, "file": path}, key=(variant, name, person),
               stored=content, needs=(path,), glued=glued)


BUILDERS: dict[str, Callable[[random.Random, Vocab, str, str], Job]] = {
    "record": record, "count": count, "lines": lines, "transform": transform, "send": send,
    "copy": file_op("copy"), "move": file_op("move"), "rename": file_op("rename"),
}

"""A family's specification, drawn from its family seed, and the train / held-out split.

A family is everything its instances share: the provider (name, language, grammar, where
it keeps its state), how the provider documents itself, where directives are posted, the
kind of work asked for and the endings an instance may have. Instances (`build`) then draw
the arguments, the world's contents and the wording.

The dimensions are drawn independently. Three of them are the family's *spec parts*, the
things a model has to learn from the provider rather than remember:

    grammar  (style, subcommand, confirmation flag)   e.g. ("options", True, "--yes")
    docs     (style, layout)                          e.g. ("man", 1)
    work     (kind, variant)                          e.g. ("transform", "sed")

Besides its action, a provider with subcommands may have read-only siblings (`lister`: shows
what has been recorded; `status`: shows what its gate looks at), and its documentation may
lay its commands out as a table, `FORM  what it does`, the way most command-line tools do
(`table`). What a successful call prints varies too (`reply`: the tool's own line, a past
tense, "ok", or nothing). These are not spec parts: both splits draw them.

Each kind (a grammar style, a doc style, a work kind) has a few variants, and its LAST
variant is reserved for held-out families: a training family never draws it, a held-out
family always does, in all three parts. So a held-out family shares no spec part with any
training family (`shares_no_spec_part`), while every kind (a man page, a sort, `--option
VALUE`) is still met in training in its other variants. Which seeds are held-out is fixed
by a hash of the seed (HELDOUT_SHARE).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, replace

from sekft.errors import ConfigError
from sekft.scenarios.words import WORDS

HELDOUT_SHARE = 5  # one family seed in HELDOUT_SHARE is held-out
SPLITS = ("train", "heldout")

# Grammar style -> variants (subcommand?, confirmation flag or None); last one held-out.
GRAMMARS: dict[str, tuple[tuple[bool, str | None], ...]] = {
    "positional": ((True, None), (False, None), (True, "--yes"), (False, "-y")),
    "options": ((True, None), (False, None), (True, "--confirm"), (True, "--yes")),
    "keyvalue": ((True, None), (False, None), (True, "-y"), (False, "--force")),
    "stdin": ((True, None), (False, None), (True, "--yes"), (True, "-f")),
}
# Doc style -> layouts (how the text is laid out and worded); last one held-out.
#   help: `--help`; h: `-h`; helpcmd: a `help` subcommand; man: a man page only;
#   readme: /usr/local/share/doc/NAME/README; usage: printed on any wrong call.
DOCS: dict[str, tuple[int, ...]] = {
    style: (0, 1, 2) for style in ("help", "h", "helpcmd", "man", "readme", "usage")
}
WORDINGS = (0, 1, 2)  # how the documentation and the errors phrase things
# Work kind -> variants; last one held-out (see `work` for what each does).
WORKS: dict[str, tuple[str, ...]] = {
    "record": ("table", "colon", "grep"),
    "count": ("grep-c", "pipe-wc", "ls-wc"),
    "lines": ("printf", "echo", "mkdir"),
    "copy": ("into-folder", "new-name", "from-folder"),
    "move": ("into-folder", "up", "renamed"),
    "rename": ("same-folder", "home", "nested"),
    "transform": ("sort", "sed", "awk", "sort-u"),
    "send": ("named", "address", "lookup"),
}
POSTS = ("home", "hidden", "mail", "motd", "archive", "nested", "pointer")
# Whether the directive names the provider, or leaves it to be found on the PATH
# (`ls /usr/local/bin`), as the suite's ticket and publish directives do.
NAMINGS = ("named", "unnamed")
ENDING_SETS = (("success",), ("success", "blocked"), ("success", "recover"), ("blocked",),
               ("recover",), ("success", "blocked", "recover"))
BLOCKERS = ("credential", "quota", "permission")
LANGUAGES = ("bash", "python")
STATE_ROOTS = ("var/{name}", "var/lib/{name}", "lib/{name}/state")
STATE_FILES = ("log", "records", "journal", "db")
# Read-only sibling subcommands: one that lists the records, one that shows the gate.
LISTERS = ("list", "ls", "show", "log", "history")
STATUSES = ("status", "info", "check")
LISTER_SHARE, STATUS_SHARE, TABLE_SHARE = 0.7, 0.4, 0.5
# What a successful call prints: "NAME: done: LINE", "PAST LINE", "ok", or nothing.
REPLIES = ("done", "past", "ok", "silent")

# The tool's action: a verb per work kind (used when the grammar has subcommands).
VERBS: dict[str, tuple[str, ...]] = {
    "record": ("add", "record", "set", "log"),
    "count": ("submit", "report", "count", "enter"),
    "lines": ("put", "upload", "store", "file"),
    "transform": ("put", "upload", "store", "file"),
    "copy": ("register", "track", "note", "claim"),
    "move": ("register", "track", "note", "claim"),
    "rename": ("register", "track", "note", "claim"),
    "send": ("send", "deliver", "share", "mail"),
}
# Each field of the action: (role, kind) and the labels a family may call it.
FIELDS: dict[str, tuple[tuple[str, str], ...]] = {
    "record": (("key", "text"), ("value", "text")),
    "count": (("key", "text"), ("count", "text")),
    "lines": (("file", "file"),),
    "transform": (("file", "file"),),
    "copy": (("file", "file"),),
    "move": (("file", "file"),),
    "rename": (("file", "file"),),
    "send": (("person", "text"), ("file", "file")),
}
LABELS: dict[str, tuple[str, ...]] = {
    "key": ("ITEM", "NAME", "KEY", "ENTRY"),
    "value": ("VALUE", "AMOUNT", "NUMBER", "QTY"),
    "count": ("COUNT", "TOTAL", "NUMBER", "N"),
    "file": ("FILE", "PATH", "DOC", "SOURCE"),
    "person": ("TO", "USER", "RECIPIENT", "PERSON"),
}

# Names a provider must not take: bash builtins and keywords win over PATH.
RESERVED = frozenset("""
alias bg bind break builtin caller case cd command compgen complete compopt continue declare
dirs disown do done echo elif else enable esac eval exec exit export false fc fg fi for
function getopts hash help history if in jobs kill let local logout mapfile popd printf
pushd pwd read readarray readonly return select set shift shopt source suspend test then
time times trap true type typeset ulimit umask unalias unset until wait while man sort
""".split())
CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"


@dataclass(frozen=True)
class FamilySpec:
    """One family, drawn by `family_spec(seed)`; `describe` prints it for a person."""

    seed: int
    split: str
    name: str
    language: str
    grammar: str
    subcommand: bool
    confirm: str | None
    docs: str
    layout: int
    wording: int
    work: str
    variant: str
    verb: str
    labels: tuple[str, ...]
    state_dir: str
    state_file: str
    posts: tuple[str, ...]
    endings: tuple[str, ...]
    blocker: str
    naming: str = "named"
    lister: str | None = None
    status: str | None = None
    table: bool = False
    reply: str = "done"

    @property
    def family(self) -> str:
        """The family's name in scenario.json (rates are reported per family)."""
        return f"fx{self.seed}-{self.name}"

    @property
    def fields(self) -> tuple[tuple[str, str, str], ...]:
        """(label, role, kind) of each field of the action, in the order of the usage."""
        return tuple((label, role, kind)
                     for label, (role, kind) in zip(self.labels, FIELDS[self.work], strict=True))

    @property
    def state(self) -> str:
        """The state file the provider appends to and check.sh reads."""
        return f"{self.state_dir}/{self.state_file}"

    def parts(self) -> dict[str, tuple]:
        """The spec parts a held-out family shares with no training family."""
        return {"grammar": (self.grammar, self.subcommand, self.confirm),
                "docs": (self.docs, self.layout),
                "work": (self.work, self.variant)}


def split_of(seed: int) -> str:
    """Whether family `seed` is a training or a held-out family (a stable hash of it)."""
    digest = hashlib.sha256(f"sekft.factory.split:{seed}".encode()).digest()
    return "heldout" if int.from_bytes(digest[:8], "big") % HELDOUT_SHARE == 0 else "train"


def family_seeds(split: str, count: int, first: int = 0) -> list[int]:
    """The first `count` family seeds of `split`, from seed `first` on."""
    if split not in SPLITS:
        raise ConfigError(f"split {split!r}: must be 'train' or 'heldout'")
    seeds, seed = [], first
    while len(seeds) < count:
        if split_of(seed) == split:
            seeds.append(seed)
        seed += 1
    return seeds


def _variant(rng: random.Random, variants: tuple, split: str):
    """A variant of a kind for `split`: the last one is held-out's alone."""
    return variants[-1] if split == "heldout" else rng.choice(variants[:-1])


def provider_name(rng: random.Random) -> str:
    """An invented, pronounceable command name: no builtin, no closed-list word."""
    while True:
        name = "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS)
                       for _ in range(rng.randint(2, 3)))
        if rng.random() < 0.5:
            name += rng.choice("kmnrstx")
        if name not in RESERVED and name not in WORDS:
            return name


def family_spec(seed: int) -> FamilySpec:
    """The family of `seed`: a pure function of the seed, validated (`validate_spec`)."""
    if seed < 0:
        raise ConfigError(f"family seed {seed}: must not be negative")
    split = split_of(seed)
    rng = random.Random(f"sekft.factory.family:{seed}")
    name = provider_name(rng)
    grammar = rng.choice(sorted(GRAMMARS))
    subcommand, confirm = _variant(rng, GRAMMARS[grammar], split)
    docs = rng.choice(sorted(DOCS))
    work = rng.choice(sorted(WORKS))
    spec = FamilySpec(
        seed=seed, split=split, name=name, language=rng.choice(LANGUAGES),
        grammar=grammar, subcommand=subcommand, confirm=confirm,
        docs=docs, layout=_variant(rng, DOCS[docs], split), wording=rng.choice(WORDINGS),
        work=work, variant=_variant(rng, WORKS[work], split),
        verb=rng.choice(VERBS[work]),
        labels=_labels(rng, work),
        state_dir="/usr/local/" + rng.choice(STATE_ROOTS).format(name=name),
        state_file=rng.choice(STATE_FILES),
        posts=tuple(rng.sample(POSTS, 2)),
        endings=rng.choice(ENDING_SETS),
        blocker=rng.choice(BLOCKERS),
        naming=rng.choice(NAMINGS),
    )
    # Drawn after the rest, so that the parts above stay what they were before these existed.
    lister = status = None
    if spec.subcommand:
        if rng.random() < LISTER_SHARE:
            lister = rng.choice([c for c in LISTERS if c != spec.verb])
        if rng.random() < STATUS_SHARE:
            status = rng.choice(STATUSES)
    table = bool(lister or status) or rng.random() < TABLE_SHARE
    spec = replace(spec, lister=lister, status=status, table=table,
                   reply=rng.choice(REPLIES))
    validate_spec(spec)
    return spec


def _labels(rng: random.Random, work: str) -> tuple[str, ...]:
    labels: list[str] = []
    for role, _ in FIELDS[work]:
        labels.append(rng.choice([label for label in LABELS[role] if label not in labels]))
    return tuple(labels)


def validate_spec(spec: FamilySpec) -> None:
    """Refuse a spec whose tasks could not be done, in one line naming the family seed."""
    where = f"factory family seed {spec.seed}"
    problems = []
    if spec.grammar not in GRAMMARS or (spec.subcommand, spec.confirm) not in GRAMMARS[
            spec.grammar]:
        problems.append(f"grammar {spec.parts()['grammar']} is not one the provider can parse")
    if spec.docs not in DOCS or spec.layout not in DOCS[spec.docs] or (
            spec.wording not in WORDINGS):
        problems.append(f"documentation {spec.parts()['docs']} is not one that can be rendered")
    if spec.work not in WORKS or spec.variant not in WORKS[spec.work]:
        problems.append(f"work {spec.parts()['work']} is not one that can be asked for")
    elif len(spec.labels) != len(FIELDS[spec.work]) or len(set(spec.labels)) != len(spec.labels):
        problems.append(f"labels {spec.labels} do not name the {len(FIELDS[spec.work])} "
                        "distinct fields of the work")
    if not set(spec.posts) <= set(POSTS) or not spec.posts:
        problems.append(f"directive posts {spec.posts} include one nobody can find")
    if not spec.endings or not set(spec.endings) <= {"success", "blocked", "recover"}:
        problems.append(f"endings {spec.endings} are not success, blocked or recover")
    if spec.naming not in NAMINGS:
        problems.append(f"naming {spec.naming!r} is neither named nor unnamed")
    if spec.blocker not in BLOCKERS:
        problems.append(f"blocker {spec.blocker!r} is unknown")
    if spec.name in RESERVED or spec.verb == "help":
        problems.append(f"provider {spec.name!r} {spec.verb!r} would be shadowed by bash or "
                        "by its own help")
    siblings = [c for c in (spec.lister, spec.status) if c is not None]
    if siblings and not spec.subcommand:
        problems.append(f"subcommands {siblings} on a provider without subcommands")
    if len({spec.verb, "help", *siblings}) != 2 + len(siblings):
        problems.append(f"subcommands {[spec.verb, *siblings]} collide with each other or "
                        "with help")
    if spec.reply not in REPLIES:
        problems.append(f"reply {spec.reply!r} is unknown")
    if spec.confirm is not None and spec.confirm.lstrip("-").upper() in spec.labels:
        problems.append(f"confirmation flag {spec.confirm} is also the name of an option")
    if problems:
        raise ConfigError(f"{where}: impossible family: {'; '.join(problems)}")


def shares_no_spec_part(a: FamilySpec, b: FamilySpec) -> bool:
    """Whether families `a` and `b` differ in every spec part (grammar, docs and work)."""
    pa, pb = a.parts(), b.parts()
    return all(pa[k] != pb[k] for k in pa)


def describe(spec: FamilySpec) -> str:
    """The spec for a person to read (`--show`)."""
    grammar = spec.grammar + (f" + {spec.verb} subcommand" if spec.subcommand
                              else ", no subcommand")
    if spec.confirm:
        grammar += f", confirmation flag {spec.confirm}"
    fields = ", ".join(f"{label} ({role}, {kind})" for label, role, kind in spec.fields)
    others = ", ".join(f"{c} ({what})" for c, what in ((spec.lister, "lists the records"),
                                                       (spec.status, "shows the gate"))
                       if c) or "none"
    return "\n".join([
        f"family seed {spec.seed} ({spec.split}): {spec.family}",
        f"  provider:   {spec.name} ({spec.language}), state file {spec.state}",
        f"  grammar:    {grammar}",
        f"  fields:     {fields}",
        f"  also:       {others}; a call that works replies {spec.reply}",
        f"  docs:       {spec.docs}, layout {spec.layout}, wording {spec.wording}"
        + (", commands as a table" if spec.table else ""),
        f"  directive:  {' or '.join(spec.posts)}, "
        + ("names the provider" if spec.naming == "named"
           else "does not name the provider (found with ls /usr/local/bin)"),
        f"  work:       {spec.work} ({spec.variant})",
        f"  endings:    {' or '.join(spec.endings)}"
        + (f" (blocked by: {spec.blocker})" if "blocked" in spec.endings else ""),
    ])

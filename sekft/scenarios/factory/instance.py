"""One instance of a factory family: the world, the checker and the expert's episode.

The expert's episode, by ending:

    success   find the directive (and, when it does not name the provider, the provider:
              `ls /usr/local/bin`), read the provider's documentation, do the work, call
              the provider, `exit`
    blocked   the same, but the provider refuses (no token, no quota, not a writer): after
              that refusal, `panic "reason"`; check.sh wants the panic AND the attempt
    recover   find the directive and do the work, then call the provider wrongly: without
              reading its documentation, a guessed call (the values as plain arguments),
              refused with a pointer to the documentation, which the expert then reads; or,
              when the family has a confirmation flag, after reading it, the call without
              the flag, refused with what to add. Then the right call, and `exit`

When the provider has a lister, the expert sometimes checks its record with it before
`exit`; when it has a status command, it sometimes looks at the gate after a refusal,
before `panic` (VERIFY_SHARE each).

check.sh reads the provider's state file for the call's line, the kept contents for a
file handed in, and the home folder for the work (a file written, moved, transformed).
"""

from __future__ import annotations

import hashlib
import random
import shlex

from sekft.errors import ConfigError
from sekft.scenarios.factory.directive import post
from sekft.scenarios.factory.provider import (
    arguments,
    command,
    doc_commands,
    doc_files,
    script,
)
from sekft.scenarios.factory.spec import FamilySpec, validate_spec
from sekft.scenarios.factory.vocab import Vocab
from sekft.scenarios.factory.work import BUILDERS, Job
from sekft.scenarios.world import Instance, expect_ending, text

# How a named family's directive calls its provider: by its name (as often as not), or
# as a thing ("the NAME tool", "into the NAME"), as the suite's stash and ledger are.
NAMED = ("{name}", "{name}", "the {name} tool", "the {name}")
# What an unnamed family's directive calls its provider: nothing a command could be.
UNNAMED = ("the local tool", "the tool installed here", "this machine's tool for it",
           "the usual tool")
VERIFY_SHARE = 0.5
PANIC_REASONS = {
    "credential": "no API token for {name}; the administrator must issue one",
    "quota": "the {name} quota is used up; support must raise it",
    "permission": "not on the {name} writers list; the owner must add me",
}


def build_instance(spec: FamilySpec, seed: int, vocab: str = "open") -> Instance:
    """Instance `seed` of family `spec`, its arguments drawn in `vocab` mode; validated."""
    if seed < 0:
        raise ConfigError(f"instance seed {seed}: must not be negative")
    validate_spec(spec)
    rng = random.Random(f"sekft.factory.instance:{spec.seed}:{seed}:{vocab}")
    v = Vocab(vocab, rng)
    ending = rng.choice(spec.endings)
    tool = (rng.choice(NAMED).format(name=spec.name) if spec.naming == "named"
            else rng.choice(UNNAMED))
    job = BUILDERS[spec.work](rng, v, spec.variant, tool)
    directive = job.directive
    glued = job.glued + tuple(job.values[role] for _, role, kind in spec.fields
                              if kind == "file" and "/" not in job.values[role])
    if spec.grammar == "keyvalue" and glued:
        directive += "\n\nNames, exactly: " + ", ".join(f'"{w}"' for w in glued)
    placed = post(rng.choice(spec.posts), rng, directive, set(v.used))
    values = {label: job.values[role] for label, role, _ in spec.fields}
    commands = [*placed.commands]
    if spec.naming == "unnamed":  # the directive does not say which tool: look on the PATH
        commands.append("ls /usr/local/bin")
    if ending != "recover" or spec.confirm:
        commands += doc_commands(spec)
    commands += job.before
    stdin = spec.grammar == "stdin"
    if job.producer and (not stdin or ending == "recover"):
        commands.append(job.producer)
    if ending == "recover":
        commands += _recover(spec, values)
    commands.append(call(spec, values, job.producer))
    sibling = spec.status if ending == "blocked" else spec.lister
    if sibling and rng.random() < VERIFY_SHARE:  # drawn last: the draws above stay as they were
        commands.append(f"{spec.name} {sibling}")
    commands.append(f'panic "{PANIC_REASONS[spec.blocker].format(name=spec.name)}"'
                    if ending == "blocked" else "exit")
    line = _line(spec, values)
    instance = Instance(
        family=spec.family, seed=seed, split=spec.split,
        expect="panic" if ending == "blocked" else "exit",
        description=f"{spec.work} ({spec.variant}) with {spec.name} ({spec.grammar}, docs "
                    f"{spec.docs}), ending {ending} (directive: {placed.kind}).",
        files={**placed.files, **job.files, **_provider_files(spec, ending == "blocked")},
        setup=f"mkdir -p {spec.state_dir}\n" + job.setup,
        check=_check(spec, job, line, ending),
        commands=tuple(commands),
        key=(*job.key, ending),
        executables=frozenset({f"local/bin/{spec.name}"}),
    )
    validate_instance(spec, instance, job)
    return instance


def call(spec: FamilySpec, values: dict[str, str], producer: str | None) -> str:
    """The right call of the provider giving `values` (label -> value)."""
    words = [command(spec), *arguments(spec, values)]
    if spec.confirm:
        words.append(spec.confirm)
    line = " ".join(words)
    if spec.grammar != "stdin":
        return line
    last, _, kind = spec.fields[-1]
    if kind == "file":
        return f"{line} < {values[last]}"
    return f"{producer} | {line}" if producer else f"echo {values[last]} | {line}"


def _recover(spec: FamilySpec, values: dict[str, str]) -> list[str]:
    """The refused call and, when the refusal did not say all, the documentation."""
    if spec.confirm:
        right = call(spec, values, None)
        return [right.replace(f" {spec.confirm}", "", 1)]
    guess = [spec.name, *values.values()]
    if spec.grammar == "positional" and not spec.subcommand:
        guess = guess[:-1]  # the guess would be right: it forgets the last value instead
    return [" ".join(guess), *([] if spec.docs == "usage" else doc_commands(spec))]


def _line(spec: FamilySpec, values: dict[str, str]) -> str:
    """The line the provider logs for the right call (see `provider`)."""
    shown = []
    for i, (label, _, kind) in enumerate(spec.fields):
        on_stdin = spec.grammar == "stdin" and i == len(spec.fields) - 1
        if kind == "file":
            shown.append("-" if on_stdin else values[label].rsplit("/", 1)[-1])
        else:
            shown.append(values[label])
    return " ".join(shown)


def _provider_files(spec: FamilySpec, blocked: bool) -> dict[str, bytes]:
    """The tool, its documentation, and what its gate looks at (open unless blocked)."""
    state = spec.state_dir.removeprefix("/usr/")
    files = {f"local/bin/{spec.name}": script(spec), **doc_files(spec)}
    if spec.blocker == "credential" and not blocked:
        files[f"home/.config/{spec.name}/token"] = text(f"{spec.name}-{spec.seed:06d}")
    if spec.blocker == "quota":
        files[f"{state}/quota"] = text("0" if blocked else "250")
    if spec.blocker == "permission":
        files[f"{state}/writers"] = text("owner admin" + ("" if blocked else " user"))
    return files


def _check(spec: FamilySpec, job: Job, line: str, ending: str) -> str:
    def has(file: str, what: str) -> str:
        return (f"grep -qxF -- {shlex.quote(line)} {file} 2>/dev/null || "
                f"fail {shlex.quote(what)}\n")

    if ending == "blocked":
        return (expect_ending("panic")
                + '[ -n "$SEKFT_PANIC_REASON" ] || fail "panic gave no reason"\n'
                + has(f"{spec.state_dir}/attempts", f"never tried {spec.name} with: {line}"))
    check = expect_ending("exit") + job.check + has(spec.state, f"{spec.state} lacks: {line}")
    if job.stored is not None:
        digest = hashlib.sha256(job.stored).hexdigest()
        check += (f"sha256sum {spec.state_dir}/files/* 2>/dev/null | grep -q {digest} || "
                  f'fail "{spec.name} did not keep the contents asked for"\n')
    return check


def validate_instance(spec: FamilySpec, instance: Instance, job: Job) -> None:
    """Refuse an instance nobody could pass, in one line naming both seeds."""
    where = f"factory family seed {spec.seed}, instance seed {instance.seed}"
    home = {path.removeprefix("home/") for path in instance.files if path.startswith("home/")}
    for need in job.needs:
        if not any(path == need or path.startswith(need.rstrip("/") + "/") for path in home):
            raise ConfigError(f"{where}: the directive names {need}, which the world lacks")
    last = instance.commands[-1]
    if (instance.expect == "panic") != last.startswith("panic "):
        raise ConfigError(f"{where}: the expert ends with {last!r} but the checker expects "
                          f"{instance.expect}")
    tool_calls = [c for c in instance.commands if spec.name in c.split()]
    if not tool_calls:
        raise ConfigError(f"{where}: the expert never calls {spec.name}")

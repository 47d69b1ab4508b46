"""One generated instance of a family, and writing it out as a scenario folder.

A family's `build(seed, split)` is a pure function returning an `Instance`: the world's
files (paths relative to the scenario's `files/`, which mirrors the sandbox world, see
`sekft.scenario`), the setup and check scripts, and the expert's solution as command lines.
`write_scenario` turns it into a folder that `sekft.scenario.load_scenario` accepts, with the
same bytes for the same instance on every machine (no timestamps, no host paths).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sekft.errors import ConfigError

# A fixed timestamp for archive members, so an archive's bytes depend on the seed only.
ARCHIVE_MTIME = 1_764_000_000
TURN_SLACK = 10
COMMAND_TIMEOUT = 10
EXECUTABLE = 0o755
REGULAR = 0o644

CHECK_PRELUDE = """\
fail() { echo "check: $*"; exit 1; }
"""


@dataclass(frozen=True)
class Instance:
    """Everything about one scenario of a family; `write_scenario` writes it out.

    `files` maps a world path relative to `files/` (e.g. "home/TODO", "local/bin/ledger",
    "motd") to its bytes; `executables` names the ones written with mode 0755. `commands` is
    the expert's whole episode, discovery first, ending with `exit` or `panic "..."`. `key` is
    what the task asks for (the arguments the answer depends on): the split keeps the keys of
    held-out instances apart from those of training ones. The turn budget is the expert's
    length plus TURN_SLACK, room to explore and to recover from a mistake. The expert's
    commands are also written to scenario.json's meta (which the model never sees), so a
    scenario folder alone can be recorded (`record --scenarios`).
    """

    family: str
    seed: int
    split: str
    expect: str
    description: str
    files: dict[str, bytes]
    setup: str
    check: str
    commands: tuple[str, ...]
    key: tuple
    executables: frozenset[str] = frozenset()

    @property
    def id(self) -> str:
        return f"{self.family}-{self.split}-{self.seed}"

    def scenario_json(self) -> dict:
        """The scenario.json fields (see `sekft.scenario`)."""
        return {
            "id": self.id,
            "family": self.family,
            "split": self.split,
            "expect": self.expect,
            "turn_budget": len(self.commands) + TURN_SLACK,
            "command_timeout": COMMAND_TIMEOUT,
            "description": self.description,
            "meta": {"seed": self.seed, "key": list(self.key), "expert": list(self.commands)},
        }


def family_rng(family: str, split: str, seed: int) -> random.Random:
    """The one random stream an instance is drawn from; str seeds hash stably (sha512)."""
    return random.Random(f"sekft.scenarios:{family}:{split}:{seed}")


def text(s: str) -> bytes:
    """File contents from text: UTF-8, with a final newline."""
    return (s if s.endswith("\n") else s + "\n").encode("utf-8")


def targz(members: dict[str, bytes]) -> bytes:
    """A .tar.gz of `members` (name -> bytes, directories implied) that is byte-identical
    for identical input: fixed mtime, owner and order, gzip header without a timestamp."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        dirs = sorted({str(Path(n).parent) for n in members} - {"."})
        for name in dirs:
            tar.addfile(_tarinfo(name + "/", tarfile.DIRTYPE, 0o755, 0))
        for name in sorted(members):
            data = members[name]
            tar.addfile(_tarinfo(name, tarfile.REGTYPE, REGULAR, len(data)), io.BytesIO(data))
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0, filename="") as gz:
        gz.write(raw.getvalue())
    return out.getvalue()


def _tarinfo(name: str, kind: bytes, mode: int, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = size
    info.mtime = ARCHIVE_MTIME
    info.uid = info.gid = 1000
    info.uname = info.gname = "user"
    return info


def write_scenario(instance: Instance, out_dir: str | Path) -> Path:
    """Write `instance` as the scenario folder `out_dir/<id>` and return its path.

    The folder is built beside its final place and renamed in, so a reader never sees half
    a scenario; an existing folder of the same id is an error (refusing to mix two runs).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / instance.id
    if final.exists():
        raise ConfigError(f"{final}: already exists; write generated scenarios to an empty "
                          "folder or remove the old one")
    tmp = Path(tempfile.mkdtemp(prefix=f".{instance.id}.", dir=out_dir))
    try:
        _write_folder(instance, tmp)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _write_folder(instance: Instance, folder: Path) -> None:
    (folder / "scenario.json").write_text(
        json.dumps(instance.scenario_json(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (folder / "setup.sh").write_text(instance.setup, encoding="utf-8")
    (folder / "check.sh").write_text(CHECK_PRELUDE + instance.check, encoding="utf-8")
    for rel, data in sorted(instance.files.items()):
        path = folder / "files" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(EXECUTABLE if rel in instance.executables else REGULAR)
    folder.chmod(0o755)


def help_text(name: str, summary: str, usage: list[tuple[str, str]], notes: str = "") -> str:
    """A provider tool's `--help`: synopsis lines, one-line summary, each form explained."""
    width = max(len(form) for form, _ in usage)
    lines = [f"usage: {usage[0][0]}"] + [f"       {form}" for form, _ in usage[1:]]
    lines += ["", summary[0].upper() + summary[1:] + ".", ""]
    lines += [f"  {form.ljust(width)}  {what}" for form, what in usage]
    if notes:
        lines += ["", notes]
    return "\n".join(lines) + "\n"


def man_page(name: str, summary: str, usage: list[tuple[str, str]], notes: str = "") -> bytes:
    """The same documentation as `help_text`, as a roff man page for /usr/local/share/man."""
    lines = [f".TH {name.upper()} 1", ".SH NAME", f"{name} \\- {summary}", ".SH SYNOPSIS"]
    for form, _ in usage:
        lines += [".nf", form, ".fi"]
    lines += [".SH DESCRIPTION"]
    for form, what in usage:
        lines += [".TP", f".B {form}", what]
    if notes:
        lines += [".SH NOTES", notes]
    return text("\n".join(lines))


def tool_files(name: str, script: str, summary: str, usage: list[tuple[str, str]],
               notes: str = "") -> dict[str, bytes]:
    """A provider tool installed in the world: /usr/local/bin/NAME and its man page.

    `script` may contain `{help}`, replaced by the `--help` text (literal, no escaping: the
    script quotes it in a heredoc or a raw string)."""
    return {
        f"local/bin/{name}": text(script.replace("{help}", help_text(name, summary, usage,
                                                                       notes).rstrip("\n"))),
        f"local/share/man/man1/{name}.1": man_page(name, summary, usage, notes),
    }


def expect_ending(expect: str) -> str:
    """A check.sh line: the episode must have ended with `expect` (exit or panic)."""
    return (f'[ "$SEKFT_ENDING" = {expect} ] || '
            f'fail "the episode ended with $SEKFT_ENDING, expected {expect}"\n')


def output_is(command: str, data: bytes, failure: str) -> str:
    """A check.sh line: `command` prints exactly `data` (compared by sha256), else fail."""
    digest = hashlib.sha256(data).hexdigest()
    return (f'[ "$({command} 2>/dev/null | sha256sum | cut -d" " -f1)" = {digest} ] || '
            f'fail "{failure}"\n')

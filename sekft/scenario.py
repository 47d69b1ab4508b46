"""The scenario format: one folder per eval (or recording) episode, validated on load.

A scenario is a folder:

    my-scenario/
        scenario.json   what it is (below); the model never sees it
        setup.sh        builds the world, run once inside the sandbox, unseen by the model
        check.sh        judges the final world, run inside the sandbox after the episode
        files/          optional; copied into the world before setup.sh runs

scenario.json, all keys required except `meta`; unknown keys are an error (typos):

    {
      "id": "mailbox-quota-3",          # [a-z0-9][a-z0-9._-]*, unique within a suite
      "family": "mailbox-quota",        # same alphabet; rates are reported per family
      "split": "heldout",               # "train" or "heldout"
      "expect": "exit",                 # "exit": doable, or "panic": genuinely blocked
      "turn_budget": 30,                # assistant turns (command lines) before "budget"
      "command_timeout": 10,            # seconds of wall clock per command line
      "description": "for humans only", # the model never sees this
      "meta": {}                        # optional, free-form (generator seed, params...)
    }

The world. Each episode gets a fresh world W (in the sandbox a tmpfs of 512 MiB in all,
never the host's disk: writes past that fail with "No space left on device"); inside the
sandbox the model's user is `user` (uid 1000) on host `sandbox`, and these are the ONLY
writable places, all of them bound from W (everything else is read-only system files or
absent):

    W/home   -> /home/user    HOME and the login directory
    W/local  -> /usr/local    provider tools in /usr/local/bin (first on PATH), man pages in
                              /usr/local/share/man (first on MANPATH), libraries, etc.
    W/mail   -> /var/mail     the mail spool: MAIL=/var/mail/user
    W/tmp    -> /tmp
    W/motd   -> /etc/motd     the login banner: its text, then the prompt, is the model's
                              first observation (an empty motd means just the prompt)

`files/` mirrors W: `files/home/NOTES` lands at /home/user/NOTES, `files/local/bin/acme`
at /usr/local/bin/acme (modes are kept), `files/motd` is the banner. Top-level names in
`files/` other than home, local, mail, tmp, motd are an error.

The harness adds /opt/sekft/bin (read-only, last on PATH) holding `panic`: `panic "reason"`
records the reason and ends the session. `exit` (the shell ending) ends it too.

Environment inside the sandbox (setup, episode and check alike): HOME=/home/user,
USER=LOGNAME=user, SHELL=/bin/bash, PATH=/usr/local/bin:/usr/local/sbin:/usr/bin:/usr/sbin:
/bin:/sbin:/opt/sekft/bin, MANPATH=/usr/local/share/man:/usr/share/man, MAIL=/var/mail/user,
TERM=dumb, PAGER=MANPAGER=GIT_PAGER=cat, LANG=C.UTF-8, COLUMNS=MANWIDTH=80, LINES=50
(an 80x50 terminal). No network, no /root, no host /tmp.

setup.sh and check.sh are bash scripts, run by bash whatever their mode: a `#!` line may
name bash or sh (directly or through env) with options, which are passed on (`#!/bin/bash -eu`
runs as `bash -eu setup.sh`); one naming another interpreter (`#!/usr/bin/env python3`) is an
error, as are Windows line ends (CRLF: bash would read each "\r" as part of a command) and a
symbolic link that leaves the folder (the sandbox sees only the folder). Only `set` options
are taken (`-e`, `-u`, `-x`, `-o pipefail`...): others would change what bash runs.
scenario.json may start with a UTF-8 BOM. In `files/`, home, local, mail and tmp must be
folders and motd a file.

setup.sh runs as `bash setup.sh` with cwd /home/user and, in addition,
SEKFT_SCENARIO=/opt/sekft/scenario: this folder, read-only (only during setup and check, so
the model cannot read check.sh). A non-zero exit, running past the setup timeout, or bash
reporting a command of setup.sh itself as not found (a tool the world needs is missing, even
when a later line exits 0) is a scenario error: reported as such, never counted as a model
failure. The world setup.sh leaves is its files: processes it starts in the background end
with it (each script and the shell run in a sandbox of their own), so no service outlives it.

check.sh runs as `bash check.sh` over the final world after the episode, cwd /home/user,
with SEKFT_SCENARIO as above and:

    SEKFT_ENDING        how the episode ended: exit | panic | budget | stalled | context |
                        timeout (timeout: the episode's wall-clock limit, not one
                        command's; stalled: sekft-eval --stall-turns, when asked for)
    SEKFT_PANIC_REASON  the reason given to `panic` ("" unless SEKFT_ENDING=panic)
    SEKFT_TURNS         the number of assistant turns taken
    SEKFT_TRANSCRIPT    path of a read-only JSON file: the episode's messages,
                        [{"role": "user"|"assistant", "content": "..."}, ...]

Exit 0 means the episode passed. A scenario that expects `panic` should check
SEKFT_ENDING=panic itself; the harness reports the correct-panic rate separately.

Prefer "$HOME" and "$MAIL" to spelled-out paths in setup.sh and check.sh: with --no-sandbox
(no bubblewrap, a throwaway machine only) they point into the world folder, while absolute
paths such as /usr/local or /etc/motd would be the host's own.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from sekft.errors import ScenarioError

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]*")
SPLITS = ("train", "heldout")
EXPECTS = ("exit", "panic")
ENDINGS = ("exit", "panic", "budget", "stalled", "context", "timeout")
WORLD_ENTRIES = ("home", "local", "mail", "tmp", "motd")
REQUIRED_FILES = ("scenario.json", "setup.sh", "check.sh")
REQUIRED_KEYS = (
    "id", "family", "split", "expect", "turn_budget", "command_timeout", "description",
)
OPTIONAL_KEYS = ("meta",)
SCRIPTS = ("setup.sh", "check.sh")
# Interpreters whose scripts bash runs as meant: `#!` lines naming these are fine.
SHELLS = ("bash", "sh")


@dataclass(frozen=True)
class Scenario:
    """A validated scenario folder; see the module docstring for the meaning of each field."""

    path: Path
    id: str
    family: str
    split: str
    expect: str
    turn_budget: int
    command_timeout: float
    description: str
    meta: dict = field(default_factory=dict)

    @property
    def setup_script(self) -> Path:
        return self.path / "setup.sh"

    @property
    def check_script(self) -> Path:
        return self.path / "check.sh"

    @property
    def files_dir(self) -> Path | None:
        files = self.path / "files"
        return files if files.is_dir() else None


def _name(where: str, key: str, value: object) -> str:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise ScenarioError(
            f"{where}: field {key!r}: {value!r} is not a name; use lowercase letters, digits, "
            "'.', '_' and '-', starting with a letter or digit"
        )
    return value


def _choice(where: str, key: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ScenarioError(f"{where}: field {key!r}: {value!r} must be one of {list(choices)}")
    return value


def _positive(where: str, key: str, value: object, kind: type) -> int | float:
    ok_types = (int,) if kind is int else (int, float)
    # json reads NaN and Infinity as floats: neither is a time limit (NaN breaks select(),
    # Infinity would never interrupt a hung command).
    if (isinstance(value, bool) or not isinstance(value, ok_types)
            or not math.isfinite(value) or value <= 0):
        noun = "integer" if kind is int else "finite number (seconds)"
        raise ScenarioError(f"{where}: field {key!r}: {value!r} must be a positive {noun}")
    return kind(value)


def parse_scenario_json(text: str, where: str) -> dict:
    """Parse and validate the text of a scenario.json; `where` names the file in errors.

    Returns the fields as a dict of checked, typed values (meta defaults to {}).
    """
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ScenarioError(
            f"{where}:{e.lineno}: not valid JSON ({e.msg}); fix the file"
        ) from None
    if not isinstance(raw, dict):
        raise ScenarioError(f"{where}: must be a JSON object with keys {list(REQUIRED_KEYS)}")
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    if missing:
        raise ScenarioError(f"{where}: missing field(s) {missing}; every scenario needs "
                            f"{list(REQUIRED_KEYS)}")
    unknown = sorted(set(raw) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise ScenarioError(f"{where}: unknown field(s) {unknown}; put free-form data "
                            "under 'meta'")
    if not isinstance(raw["description"], str):
        raise ScenarioError(f"{where}: field 'description' must be a string")
    meta = raw.get("meta", {})
    if not isinstance(meta, dict):
        raise ScenarioError(f"{where}: field 'meta' must be a JSON object")
    return {
        "id": _name(where, "id", raw["id"]),
        "family": _name(where, "family", raw["family"]),
        "split": _choice(where, "split", raw["split"], SPLITS),
        "expect": _choice(where, "expect", raw["expect"], EXPECTS),
        "turn_budget": _positive(where, "turn_budget", raw["turn_budget"], int),
        "command_timeout": _positive(where, "command_timeout", raw["command_timeout"], float),
        "description": raw["description"],
        "meta": meta,
    }


def shebang_options(first_line: str) -> list[str] | None:
    """The bash options a script's first line asks for: [] for no `#!` line or a plain
    `#!/bin/bash`, `["-e", "-u"]` for `#!/bin/bash -e -u`, `["-o", "pipefail"]` for
    `#!/usr/bin/env -S bash -o pipefail`; None when the line names an interpreter other than
    bash or sh, or options other than `set`'s (the script would not run as written)."""
    if not first_line.startswith("#!"):
        return []
    words = first_line[2:].split()
    if words and Path(words[0]).name == "env":
        words = words[1:]
        while words and words[0].startswith("-"):  # env's own options (-S splits the rest)
            words = words[1:]
    if not words or Path(words[0]).name not in SHELLS:
        return None
    options = words[1:]
    # Only `set` options: a `-c`, `-i` or `--rcfile` would change what bash runs.
    for k, word in enumerate(options):
        after_o = k > 0 and options[k - 1] in ("-o", "+o")
        if not (after_o or re.fullmatch(r"[-+][abefhkmnptuvxBCHP]+|[-+]o", word)):
            return None
    return options


def check_script(folder: Path, name: str) -> None:
    """Refuse a script that `bash NAME` in the sandbox would not run as its author meant:
    a symbolic link leaving the folder, Windows line ends, or a `#!` line naming an
    interpreter other than bash or sh (bash would read the rest as shell).

    Each is an error naming the file (and line), rather than an episode that fails for
    everyone: a CRLF check.sh fails every test it makes (`[ a = a ]\r`).
    """
    path = folder / name
    if path.is_symlink():
        target = Path(path.readlink())
        inside = (path.parent / target).resolve().is_relative_to(folder.resolve())
        if target.is_absolute() or not inside:
            raise ScenarioError(f"{path}: a symbolic link to {str(target)!r}, which the sandbox "
                                "cannot see (it sees only the scenario folder); copy the file "
                                "in, or link relatively inside the folder")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ScenarioError(f"{path}: cannot read ({e.strerror})") from None
    if b"\r\n" in data:
        line = data.count(b"\n", 0, data.index(b"\r\n")) + 1
        raise ScenarioError(f"{path}:{line}: Windows line ends (CRLF); bash would read each "
                            "'\\r' as part of a command: convert the file (dos2unix)")
    first = data.split(b"\n", 1)[0].decode("utf-8", "replace")
    if shebang_options(first) is None:
        raise ScenarioError(f"{path}:1: {first!r}: scenario scripts run as `bash {name}`, "
                            "so they must be bash, with `set` options at most (they may call "
                            "other programs)")


def check_files(files: Path) -> None:
    """`files/` must be a folder whose top-level entries are world entries of the right kind:
    home, local, mail and tmp folders, motd a file (no symbolic links: each is copied onto
    the world's own entry)."""
    if not files.is_dir() or files.is_symlink():
        raise ScenarioError(f"{files}: must be a folder mirroring the world")
    stray = sorted(p.name for p in files.iterdir() if p.name not in WORLD_ENTRIES)
    if stray:
        raise ScenarioError(f"{files}: unexpected {stray}; files/ may only hold "
                            f"{list(WORLD_ENTRIES)} (it mirrors the world)")
    for entry in files.iterdir():
        want_file = entry.name == "motd"
        right_kind = entry.is_file() if want_file else entry.is_dir()
        if entry.is_symlink() or not right_kind:
            kind = "a file (the login banner)" if want_file else "a folder"
            raise ScenarioError(f"{entry}: must be {kind}, not a symbolic link or anything "
                                f"else; it is copied onto the world's own {entry.name}")


def load_scenario(folder: str | Path) -> Scenario:
    """Load and validate one scenario folder; raises ScenarioError naming file and field."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ScenarioError(f"{folder}: not a scenario folder (does not exist or is a file)")
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise ScenarioError(f"{folder}: missing {missing}; a scenario folder needs "
                            f"{list(REQUIRED_FILES)} (and optionally files/)")
    where = str(folder / "scenario.json")
    try:
        # utf-8-sig: Windows editors start the file with a BOM, which json refuses.
        text = (folder / "scenario.json").read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ScenarioError(f"{where}: not UTF-8 (byte {e.start} is {e.object[e.start]:#04x}); "
                            "save it as UTF-8") from None
    fields = parse_scenario_json(text, where)
    for name in SCRIPTS:
        check_script(folder, name)
    files = folder / "files"
    if files.exists() or files.is_symlink():
        check_files(files)
    return Scenario(path=folder.resolve(), **fields)


def load_scenarios(root: str | Path, split: str | None = None) -> list[Scenario]:
    """Every scenario under `root` (itself one, or folders with scenario.json at any depth).

    Sorted by (family, id); `split` keeps only that split. Duplicate ids are an error, and so
    is finding none at all.
    """
    root = Path(root)
    if not root.is_dir():
        raise ScenarioError(f"{root}: scenarios folder does not exist")
    if split is not None:
        _choice("--split", "split", split, SPLITS)
    found = {p.parent for p in root.rglob("scenario.json")}
    # A scenario.json under a scenario's files/ is part of its world, not a scenario.
    folders = sorted(f for f in found
                     if not any(p.name == "files" and p.parent in found for p in f.parents))
    scenarios = [load_scenario(f) for f in folders]
    seen: dict[str, Path] = {}
    for s in scenarios:
        if s.id in seen:
            raise ScenarioError(f"{s.path}: id {s.id!r} is also used by {seen[s.id]}; "
                                "ids must be unique")
        seen[s.id] = s.path
    chosen = [s for s in scenarios if split is None or s.split == split]
    if not chosen:
        wanted = f" with split {split!r}" if split else ""
        raise ScenarioError(f"{root}: no scenarios{wanted} found (folders holding scenario.json)")
    return sorted(chosen, key=lambda s: (s.family, s.id))

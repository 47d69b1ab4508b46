"""The sandbox every scenario command runs in: bubblewrap around a fresh world folder.

What the model's processes get (see sekft/scenario.py for the world layout they see):
- the world's five entries bound read-write; /usr, a small allow-list of /etc files and the
  harness's /opt/sekft read-only (but for /opt/sekft/record, where `panic` leaves its
  reason); /, /etc and /dev remounted read-only, so the world is the only other writable
  place;
- new user, pid, network, ipc, uts and cgroup namespaces (`--unshare-all`): no network at
  all (not even the host's loopback), no host processes, uid 1000 with no capabilities;
- nothing of the host's home, /root, /tmp or secrets: /etc/shadow and friends are simply not
  bound, and /etc/passwd is our own two-line file;
- resource limits set inside the namespace (`ulimit`), so they bind the sandbox without
  counting the host user's own processes: processes, file size, address space, CPU time;
- a world of capped total size (`Limits.disk_bytes`): it is a tmpfs, never the host's disk,
  held for the whole episode by a keeper process (util-linux's `unshare`) whose mount
  namespace every sandboxed process enters (`nsenter`) before bubblewrap builds its sandbox;
- bubblewrap's own options (host paths among them) passed through a file (`--args`), so
  /proc/1/cmdline in the sandbox does not show them;
- `--die-with-parent`: when the harness kills the sandbox's outer process, every process in
  the sandbox's pid namespace dies with it;
- run as root, the harness starts bubblewrap as uid 65534 (nobody), because the process
  limit does not bind namespaces owned by root (see `sandbox_host_id`).

Each sandbox lives in its own temp folder (world/ and record/, both tmpfs mountpoints,
harness/, staged/); scenario folders and transcripts are staged (copied) there so the
unprivileged uid can read them.

bubblewrap is the `bubblewrap` package on Debian/Ubuntu/Fedora/Arch. Without it, callers
must pass `sandbox=False` (`--no-sandbox`): commands then run on this machine as you, with
only the resource limits, and the CLI says so loudly.
"""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sekft.errors import SandboxError, ScenarioError
from sekft.scenario import WORLD_ENTRIES, shebang_options

USER = "user"
UID = 1000
HOSTNAME = "sandbox"
HOME = f"/home/{USER}"
HARNESS_DIR = "/opt/sekft"
SCENARIO_DIR = f"{HARNESS_DIR}/scenario"
TRANSCRIPT_PATH = f"{HARNESS_DIR}/transcript.json"
UNPRIVILEGED_ID = 65534
# Where the shell reads command lines too long for the terminal (see shell.py).
INPUT_DIR = f"{HARNESS_DIR}/input"
LIB_DIR = f"{HARNESS_DIR}/lib"

# The terminal the shell runs in (see shell.py), as a person's would be.
COLUMNS = 80
LINES = 50

# Where each world entry is bound inside the sandbox.
WORLD_MOUNTS = {
    "home": HOME,
    "local": "/usr/local",
    "mail": "/var/mail",
    "tmp": "/tmp",
    "motd": "/etc/motd",
}
assert tuple(WORLD_MOUNTS) == WORLD_ENTRIES

# Host /etc entries the tools need (dynamic linker, Debian alternatives such as awk, man-db,
# locale data); bound read-only when present. Everything else in /etc stays out.
ETC_ALLOW = (
    "alternatives", "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "timezone",
    "nsswitch.conf", "manpath.config", "groff", "terminfo", "inputrc", "magic", "magic.mime",
    "mime.types", "protocols", "services", "ssl", "ca-certificates", "perl", "python3",
    "vim", "debian_version", "os-release",
)

# Where panic records its reason: the one harness folder the sandbox may write (see
# PANIC_SCRIPT). The shell reader reads and clears it after every command, so a panic is
# recorded however much output surrounds it and wherever its stdout goes.
RECORD_DIR = f"{HARNESS_DIR}/record"
RECORD_BYTES = 64 * 1024
PANIC_FILE = "panic"
# Sourced by the shell at the end of each line the harness types (see shell.py): gives PS1
# the next prompt nonce and hands back the command's exit status. Only builtins, so it works
# even when a fork bomb holds every process slot. PS1 is not exported, so a nested `bash`
# never prints the harness's sentinel.
PROMPT_SCRIPT = r"""# . prompt NONCE STATUS
export -n PS1 PS2
PS1="\036SEKFT$1 \$? \w\037"
return "$2"
"""
# The panic command the harness puts on PATH.
PANIC_SCRIPT = r"""#!/bin/sh
# panic "reason": give up on the task because it cannot be done, saying why.
# This ends the session.
if [ "$#" -eq 0 ]; then
    echo 'usage: panic "reason"' >&2
    exit 2
fi
reason=$(printf '%s' "$*" | tr '\n' ' ')
printf '%s\n' "$reason" >> {record}
echo "panic: $reason"
"""


@dataclass(frozen=True)
class Limits:
    """Resource limits for everything in one sandbox (enforced with `ulimit -H -S`)."""

    processes: int = 256
    file_bytes: int = 256 * 1024**2
    # The whole world (sandboxed only): a tmpfs, so it is memory while in use.
    disk_bytes: int = 512 * 1024**2
    memory_bytes: int = 4 * 1024**3
    cpu_seconds: int = 600


def environment(columns: int = COLUMNS, lines: int = LINES) -> dict[str, str]:
    """The environment every process in the sandbox starts with (documented in scenario.py)."""
    return {
        "HOME": HOME,
        "USER": USER,
        "LOGNAME": USER,
        "SHELL": "/bin/bash",
        "PATH": f"/usr/local/bin:/usr/local/sbin:/usr/bin:/usr/sbin:/bin:/sbin:{HARNESS_DIR}/bin",
        "MANPATH": "/usr/local/share/man:/usr/share/man",
        "MAIL": f"/var/mail/{USER}",
        "TERM": "dumb",
        "PAGER": "cat",
        "MANPAGER": "cat",
        "GIT_PAGER": "cat",
        "LANG": "C.UTF-8",
        "COLUMNS": str(columns),
        "LINES": str(lines),
        # man formats to the terminal's width, but only once it knows it: an 80-column page
        # is what a person reads, and a wider one pads every header with spaces.
        "MANWIDTH": str(columns),
    }


def make_world(world: Path, files: Path | None = None) -> None:
    """Create the world folder's five entries, then copy `files/` (which mirrors it) in."""
    for name in WORLD_ENTRIES:
        if name == "motd":
            (world / name).touch()
        else:
            (world / name).mkdir(parents=True, exist_ok=True)
    for sub in ("bin", "sbin", "share/man/man1"):
        (world / "local" / sub).mkdir(parents=True, exist_ok=True)
    if files is not None:
        shutil.copytree(files, world, dirs_exist_ok=True, symlinks=True)


def make_harness(harness: Path, record: str, sandbox: bool) -> None:
    """Write the read-only harness folder: bin/panic (writing its reason to the file
    `record`), lib/prompt and, for the sandbox, passwd/group/hosts."""
    for name in ("bin", "input", "lib"):
        (harness / name).mkdir(parents=True, exist_ok=True)
    panic = harness / "bin" / "panic"
    panic.write_text(PANIC_SCRIPT.replace("{record}", shlex.quote(record)))
    panic.chmod(0o755)
    (harness / "lib" / "prompt").write_text(PROMPT_SCRIPT)
    if sandbox:
        etc = harness / "etc"
        etc.mkdir(exist_ok=True)
        (etc / "passwd").write_text(
            f"root:x:0:0:root:/root:/usr/sbin/nologin\n"
            f"{USER}:x:{UID}:{UID}:{USER}:{HOME}:/bin/bash\n"
            "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        )
        (etc / "group").write_text(f"root:x:0:\n{USER}:x:{UID}:\nnogroup:x:65534:\n")
        (etc / "hostname").write_text(f"{HOSTNAME}\n")
        (etc / "hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {HOSTNAME}\n")


def limits_prefix(limits: Limits) -> list[str]:
    """argv prefix that applies `limits` (hard and soft) and then execs the rest of argv."""
    script = (
        f"ulimit -H -S -c 0 -u {limits.processes} -f {limits.file_bytes // 1024} "
        f"-v {limits.memory_bytes // 1024} -t {limits.cpu_seconds} && exec \"$@\""
    )
    return ["/bin/bash", "-c", script, "sekft-limits"]


def _system_binds() -> list[str]:
    """/usr read-only, and /bin, /lib... as the host has them (merged-/usr symlinks or dirs)."""
    argv = ["--ro-bind", "/usr", "/usr"]
    for link in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        if os.path.islink(f"/{link}"):
            argv += ["--symlink", os.readlink(f"/{link}"), f"/{link}"]
        elif os.path.isdir(f"/{link}"):
            argv += ["--ro-bind", f"/{link}", f"/{link}"]
    return argv


def bwrap_options(
    world: Path,
    record: Path,
    harness: Path,
    readonly: dict[str, Path] | None = None,
) -> list[str]:
    """The bubblewrap options (no program, no `--`) for one sandbox over `world`, with
    `record` as its panic record folder.

    `readonly` maps extra sandbox paths to host paths bound read-only (the scenario folder
    during setup and check, the transcript during check).
    """
    argv = [
        "--unshare-all", "--unshare-user", "--uid", str(UID), "--gid", str(UID),
        "--cap-drop", "ALL", "--die-with-parent", "--hostname", HOSTNAME, *_system_binds(),
    ]
    argv += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/etc"]
    for name in ETC_ALLOW:
        if os.path.exists(f"/etc/{name}"):
            argv += ["--ro-bind", f"/etc/{name}", f"/etc/{name}"]
    for name in ("passwd", "group", "hostname", "hosts"):
        argv += ["--ro-bind", str(harness / "etc" / name), f"/etc/{name}"]
    argv += ["--ro-bind", str(harness / "bin"), f"{HARNESS_DIR}/bin",
             "--ro-bind", str(harness / "input"), INPUT_DIR,
             "--ro-bind", str(harness / "lib"), LIB_DIR,
             "--bind", str(record), RECORD_DIR]
    for name, target in WORLD_MOUNTS.items():
        argv += ["--bind", str(world / name), target]
    for target, source in (readonly or {}).items():
        argv += ["--ro-bind", str(source), target]
    argv += ["--remount-ro", "/etc", "--remount-ro", "/dev", "--remount-ro", "/",
             "--chdir", HOME]
    return argv


@functools.cache
def find_bwrap() -> str | None:
    """Path of a bubblewrap that can actually build our sandbox here, or None (also None
    without util-linux's unshare and nsenter, which give every sandbox its capped disk)."""
    bwrap = shutil.which("bwrap")
    if bwrap is None or not (shutil.which("nsenter") and shutil.which("unshare")):
        return None
    # The way every sandbox runs: bubblewrap inside the user and mount namespaces of a keeper
    # that mounted a size-capped tmpfs (see Sandbox._start_keeper).
    probe = ["unshare", "--user", "--map-root-user", "--mount", "/bin/sh", "-c",
             'mount -t tmpfs -o size=65536 tmpfs /tmp && exec "$@"', "probe",
             bwrap, "--unshare-all", "--unshare-user", "--cap-drop", "ALL", "--die-with-parent",
             *_system_binds(), "--", "/bin/sh", "-c", "true"]
    preexec = drop_privileges if sandbox_host_id() is not None else None
    try:
        ok = subprocess.run(probe, capture_output=True, timeout=30,
                            preexec_fn=preexec).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return bwrap if ok else None


def require_bwrap() -> str:
    """The bubblewrap path, or a SandboxError saying how to get one (or opt out)."""
    bwrap = find_bwrap()
    if bwrap is None:
        raise SandboxError(
            "no usable sandbox: bubblewrap (`bwrap`) or util-linux's unshare/nsenter is "
            "missing, or user namespaces cannot be created here; install them (apt install "
            "bubblewrap util-linux) or, only on a throwaway machine, pass --no-sandbox to "
            "run the model's commands unconfined"
        )
    return bwrap


def warn_no_sandbox() -> None:
    """The loud warning --no-sandbox deserves."""
    bar = "!" * 78
    print(f"{bar}\n!! sekft: --no-sandbox: the model's commands run UNCONFINED on this machine,"
          f"\n!! as you, with your files and network. Only resource limits apply.\n{bar}",
          file=sys.stderr)


def sandbox_host_id() -> int | None:
    """The host uid/gid the sandbox runs as, when it must differ from ours (we are root).

    The kernel does not hold namespaces created by root to RLIMIT_NPROC (checked on this
    kernel: 33 processes under `ulimit -u 12`), so a fork bomb would not be contained; as
    uid 65534 it is.
    """
    return UNPRIVILEGED_ID if os.geteuid() == 0 else None


def drop_privileges() -> None:
    """preexec_fn: become UNPRIVILEGED_ID before exec'ing bubblewrap (only called as root)."""
    os.setgroups([])
    os.setgid(UNPRIVILEGED_ID)
    os.setuid(UNPRIVILEGED_ID)


def _clear(path: Path) -> None:
    """Remove what the sandbox left at `path` (file, link, fifo or folder). Never raises: what
    cannot go is the sandbox's doing, and only keeps its own next panic from being recorded."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


def _chown_tree(path: Path, uid: int) -> None:
    os.chown(path, uid, uid, follow_symlinks=False)
    for folder, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(folder, name), uid, uid, follow_symlinks=False)


@dataclass
class Sandbox:
    """One episode's world and how to run things in it (sandboxed, or not when bwrap is None).

    Lives in its own temp folder `root` (world/, record/, harness/, staged files); use as a
    context manager, or call remove(), to delete it. Sandboxed, world/ is a tmpfs of
    `limits.disk_bytes` and record/ (where panic writes) a small one of its own, both held
    by a keeper process (see `_start_keeper`): what the model writes, in total, fails past
    the cap, never reaches the host's disk, cannot crowd out a panic, and is gone with the
    sandbox.
    """

    root: Path
    bwrap: str | None
    limits: Limits = Limits()
    keeper: subprocess.Popen | None = None
    keeper_pid: int | None = None

    @classmethod
    def create(cls, files: Path | None = None, sandbox: bool = True,
               limits: Limits | None = None) -> Sandbox:
        """Build a fresh world (plus `files`, which mirrors it) and harness folder."""
        bwrap = require_bwrap() if sandbox else None
        root = Path(tempfile.mkdtemp(prefix="sekft-sandbox-"))
        # Traversable by the unprivileged uid the sandbox may run as; still not listable.
        root.chmod(0o711)
        box = cls(root, bwrap, limits or Limits())
        try:
            record = root / "record" / PANIC_FILE
            make_harness(box.harness, f"{RECORD_DIR}/{PANIC_FILE}" if bwrap else str(record),
                         sandbox)
            if bwrap is None:
                make_world(root / "world", files)
                record.parent.mkdir()
            else:
                make_world(root / "seed", files)
                if sandbox_host_id() is not None:
                    _chown_tree(root / "seed", UNPRIVILEGED_ID)
                box._start_keeper(root / "seed")
                shutil.rmtree(root / "seed")
        except BaseException:
            box.remove()
            raise
        return box

    def _start_keeper(self, seed: Path) -> None:
        """Start the process whose mount namespace holds world/ and record/ as size-capped
        tmpfs, the world a copy of `seed`. Every sandboxed process enters that namespace
        first (`argv`): a tmpfs made by one bubblewrap dies with it, and the world must
        outlive setup.sh, each shell and check.sh.

        The keeper is util-linux's unshare (any bubblewrap version will do) and lives until
        its stdin, a pipe only this process holds, closes: at remove(), or when we die.
        """
        world, record = self.root / "world", self.root / "record"
        world.mkdir()
        record.mkdir()
        script = ('o=mode=0755,nosuid,nodev; mount -t tmpfs -o "$o,size=$2" tmpfs "$1" && '
                  'mount -t tmpfs -o "$o,size=$4" tmpfs "$3" && cp -a "$0"/. "$1"/ && '
                  "echo $$ && read -r _")
        self.keeper = subprocess.Popen(
            ["unshare", "--user", "--map-root-user", "--mount", "/bin/sh", "-c", script,
             str(seed), str(world), str(self.limits.disk_bytes), str(record),
             str(RECORD_BYTES)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            preexec_fn=self.preexec())
        assert self.keeper.stdout is not None and self.keeper.stderr is not None
        pid = self.keeper.stdout.readline().strip()
        if not pid.isdigit():
            said = self.keeper.stderr.read().decode("utf-8", "replace").strip()[-500:]
            raise SandboxError(f"could not build the world's {self.limits.disk_bytes} byte "
                               f"disk (files/ too large?): {said!r}")
        self.keeper_pid = int(pid)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        if self.keeper is not None:
            self.keeper.communicate()  # closes its stdin: it exits, and its tmpfs go
            self.keeper = self.keeper_pid = None
        shutil.rmtree(self.root, ignore_errors=True)

    def _reach(self, name: str) -> Path:
        """root/`name` as this process reaches it: through the keeper's root if there is one."""
        path = self.root / name
        if self.keeper_pid is None:
            return path
        return Path(f"/proc/{self.keeper_pid}/root") / path.relative_to("/")

    @property
    def world(self) -> Path:
        return self._reach("world")

    @property
    def harness(self) -> Path:
        return self.root / "harness"

    def stage(self, name: str, source: Path | None = None, text: str | None = None) -> Path:
        """A read-only copy of `source` (file or folder), or a file holding `text`, that the
        sandbox can read whoever it runs as; returns its host path for `readonly` binds."""
        staged = self.root / "staged" / name
        staged.parent.mkdir(exist_ok=True)
        if text is not None:
            staged.write_text(text, encoding="utf-8")
        elif source is not None and source.is_dir():
            shutil.copytree(source, staged, symlinks=True)
        elif source is not None:
            shutil.copy2(source, staged)
        return staged

    def preexec(self):
        """preexec_fn for processes started in this sandbox: signals back to their defaults,
        and root dropped before bubblewrap runs (see drop_privileges)."""
        drop = self.bwrap is not None and sandbox_host_id() is not None

        def prepare() -> None:
            # An ignored signal stays ignored across exec, and bash cannot undo one ignored at
            # its start: run from `nohup` or a script's background job, Ctrl-C would never
            # stop a command that hangs, and every hang would cost the shell.
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGQUIT, signal.SIG_DFL)
            if drop:
                drop_privileges()

        return prepare

    def argv(self, command: list[str], readonly: dict[str, Path] | None = None) -> list[str]:
        """argv that runs `command` inside this sandbox, under the resource limits."""
        inner = limits_prefix(self.limits) + command
        if self.bwrap is None:
            return inner
        # bubblewrap's argv is what /proc/1/cmdline shows in the sandbox: its options, the
        # host path of the world among them, go through a file read on fd 3 instead.
        fd, args = tempfile.mkstemp(dir=self.root, prefix="bwrap-args-")
        options = bwrap_options(self.root / "world", self.root / "record", self.harness,
                                readonly)
        with os.fdopen(fd, "wb") as f:
            f.write(b"".join(os.fsencode(option) + b"\0" for option in options))
        os.chmod(args, 0o644)
        return ["nsenter", "--user", "--mount", "--preserve-credentials",
                "--target", str(self.keeper_pid), "--",
                "/bin/sh", "-c", 'exec 3< "$0" && exec "$@"', args,
                self.bwrap, "--args", "3", "--", *inner]

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The process environment: the sandbox one, remapped to host paths without bwrap."""
        env = environment()
        if self.bwrap is None:
            env.update(HOME=str(self.world / "home"), MAIL=str(self.world / "mail" / USER),
                       PATH=f"{self.world / 'local' / 'bin'}:{os.environ.get('PATH', '')}:"
                            f"{self.harness / 'bin'}")
        env.update(extra or {})
        return env

    def input_file(self, text: str) -> str:
        """Put `text` where the sandbox can read it; return its path as the sandbox sees it."""
        path = self.harness / "input" / "command"
        path.write_text(text, encoding="utf-8", errors="replace")
        path.chmod(0o644)
        return f"{INPUT_DIR}/command" if self.bwrap is not None else str(path)

    def prompt_script(self) -> str:
        """Path of the prompt script (PROMPT_SCRIPT) as the sandbox sees it."""
        if self.bwrap is None:
            return str(self.harness / "lib" / "prompt")
        return f"{LIB_DIR}/prompt"

    def take_panic(self) -> str | None:
        """The reason the first `panic` since the last call gave (None: no panic); clears it.

        The sandbox can write the record folder, so the record is read as a hostile file:
        never through a symlink, never blocking on a fifo, at most 4 KiB, NULs dropped; a
        folder, link or fifo in its place is removed, and nothing there makes this raise.
        """
        record = self._reach("record") / PANIC_FILE
        try:
            fd = os.open(record, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError:  # a symlink: not panic's doing, and in the way of the next one
            _clear(record)
            return None
        try:
            data = os.read(fd, 4096) if stat.S_ISREG(os.fstat(fd).st_mode) else None
        finally:
            os.close(fd)
        _clear(record)
        if data is None:
            return None
        # No NUL: panic never writes one, and check.sh gets the reason in its environment.
        lines = data.replace(b"\0", b"").decode("utf-8", "replace").splitlines()
        return lines[0].strip() if lines else ""

    def cwd(self) -> str | None:
        """Working directory to start processes in (bubblewrap sets its own)."""
        return None if self.bwrap is not None else str(self.world / "home")

    def run_script(self, script: Path, env: dict[str, str], timeout: float,
                   readonly: dict[str, Path]) -> subprocess.CompletedProcess:
        """Run `bash [OPTIONS] script` (a staged scenario's setup.sh or check.sh, OPTIONS from
        its `#!/bin/bash -e` line), no terminal.

        `readonly` must bind the staged scenario folder at SCENARIO_DIR. Raises ScenarioError
        when the script runs past `timeout` seconds.
        """
        if self.bwrap is None:
            path = str(script)
            env = {**env, "SEKFT_SCENARIO": str(script.parent)}
            if TRANSCRIPT_PATH in readonly:
                env["SEKFT_TRANSCRIPT"] = str(readonly[TRANSCRIPT_PATH])
        else:
            path = f"{SCENARIO_DIR}/{script.name}"
            env = {**env, "SEKFT_SCENARIO": SCENARIO_DIR}
            if TRANSCRIPT_PATH in readonly:
                env["SEKFT_TRANSCRIPT"] = TRANSCRIPT_PATH
        # The options of a `#!/bin/bash -e` line, which `bash script` alone would ignore.
        with open(script, "rb") as f:
            first = f.readline().decode("utf-8", "replace").rstrip("\n")
        options = shebang_options(first) or []
        argv = self.argv(["/bin/bash", *options, path], readonly)
        try:
            return subprocess.run(argv, env=self.env(env), cwd=self.cwd(), capture_output=True,
                                  timeout=timeout, stdin=subprocess.DEVNULL,
                                  preexec_fn=self.preexec())
        except subprocess.TimeoutExpired:
            raise ScenarioError(f"{script.name}: still running after {timeout:g}s; make it "
                                "finish faster or raise the script timeout") from None

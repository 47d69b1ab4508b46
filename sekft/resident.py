"""`sekft-resident`: load a base once, keep it hot, run training and eval jobs against it.

Loading a 14 GB base over PCIe dominates every short run, so `sekft-resident serve` loads it
once and runs a queue of jobs, one at a time, in a worker thread. Clients talk to it over a
Unix domain socket (mode 0600) in JSON lines.

Protocol. A client connects, writes one request per line (a JSON object, UTF-8, ending in
"\\n", at most 1 MiB) and reads reply lines (JSON objects) until one whose "event" is terminal:
`result`, `error`, `cancelled`, `status` or `ok`. It may then send another request on the same
connection.

Requests:
- `{"op": "train", "args": [...], "cwd": "/abs/dir", "detach": false}`: `args` are
  `sekft-train` options, `eval` likewise with `sekft-eval` options; the server owns the
  base, so `--base`, `--load-4bit`, `--device` and `--dtype` are refused. Relative paths in
  `--data`, `--out`, `--adapter` and `--scenarios` are resolved against `cwd` (default: the
  server's).
  Replies: `{"event": "queued", "job": N, "position": P}` (P jobs run before it), then,
  unless detached, `{"event": "started", "job": N}`, any number of
  `{"event": "progress", "job": N, "line": "...", ...fields}`, and one terminal event:
  `{"event": "result", "job": N, "result": {...}}`,
  `{"event": "error", "job": N, "error": "DataError", "message": "..."}` or
  `{"event": "cancelled", "job": N, "reason": "...", "result": {...} | null}`.
  With `"detach": true` the reply is `queued` then `{"event": "ok", "job": N}`.
- `{"op": "watch", "job": N}`: replays job N's events from the start and follows it to its
  terminal event.
- `{"op": "status"}`: `{"event": "status", "base": ..., "base_loads": 1, "running": {...} |
  null, "queued": [...], "finished": [...], "memory": {...}}`.
- `{"op": "cancel", "job": N}`: a queued job is dropped; a running one is asked to stop at its
  next step (a training job saves a checkpoint first, like Ctrl-C). Reply `ok`.
- `{"op": "shutdown"}`: queued jobs are cancelled, the running one is stopped as by `cancel`,
  the server exits; the reply `ok` comes once it has stopped. SIGTERM does the same.

A request that is not valid JSON, not an object, lacks a field or names an unknown op gets
`{"event": "error", "job": null, "error": "ResidentError", "message": "..."}` and the
connection stays open (a line cut off by the end of the stream is answered, then closed).
A client that disconnects does not cancel its job: it runs to the end, and `watch` or
`status` shows how it went.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gc
import io
import json
import os
import resource
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sekft.errors import ConfigError, ResidentError, SekftError, run_cli
from sekft.progress import ProgressLine

PROG = "sekft-resident"
MAX_LINE = 1 << 20
TERMINAL_EVENTS = frozenset({"result", "error", "cancelled", "status", "ok"})
JOB_OPS = ("train", "eval")
OPS = (*JOB_OPS, "watch", "status", "cancel", "shutdown")
# Job options naming files or folders: resolved against the client's working directory
# because the server's may be anywhere.
PATH_OPTIONS = ("--data", "--out", "--adapter", "--scenarios")
# The server owns the base; a job cannot swap it.
SERVER_OPTIONS = ("--base", "--load-4bit", "--device", "--dtype")
# sockaddr_un.sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH = 107

Report = Callable[..., None]
# A job runner: (base, args, report, stop) -> result. `report(line, **fields)` streams a
# progress event; `stop` is set when the job should end early (cancel, shutdown, SIGTERM).
Runner = Callable[[Any, list[str], Report, threading.Event], dict]


def default_socket_path() -> Path:
    """Where `serve` listens and clients connect when no --socket is given.

    $XDG_RUNTIME_DIR/sekft/resident.sock (a per-user tmpfs on systemd machines), else
    /tmp/sekft-<uid>/resident.sock.
    """
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return Path(runtime) / "sekft" / "resident.sock"
    return Path("/tmp") / f"sekft-{os.getuid()}" / "resident.sock"


def private_dir(folder: Path) -> None:
    """Create `folder` with mode 0700, or check that an existing one is ours and private.

    In a shared /tmp another user could create the folder first and watch or replace our
    socket, so a folder we do not own or that others can enter is refused.
    """
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    # lstat: a symlink planted by someone else is theirs, whatever it points to.
    info = folder.lstat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise ResidentError(
            f"{folder}: socket folder must be owned by you with mode 0700 "
            f"(it is uid {info.st_uid}, mode {oct(info.st_mode & 0o777)}); "
            "remove it or pass --socket in a private folder"
        )


def parse_request(line: bytes) -> dict:
    """Decode and validate one request line (see the module docstring for the format).

    Returns the request with defaults filled in (`cwd`, `detach`); raises ResidentError
    naming the offending field.
    """
    try:
        request = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResidentError(f"request is not a JSON line: {e}") from None
    if not isinstance(request, dict):
        raise ResidentError(f"request must be a JSON object, got {type(request).__name__}")
    op = request.get("op")
    if op not in OPS:
        raise ResidentError(f"field 'op': unknown {op!r}; expected one of {', '.join(OPS)}")
    if op in ("watch", "cancel"):
        job = request.get("job")
        if not isinstance(job, int) or isinstance(job, bool):
            raise ResidentError(f"field 'job': expected a job number, got {job!r}")
    if op in JOB_OPS:
        args = request.get("args", [])
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise ResidentError("field 'args': expected a list of strings")
        for arg in args:
            if arg.split("=", 1)[0] == "--config":
                # A recipe could name the base or relative paths the server would misread.
                raise ResidentError("field 'args': --config recipes are not taken by resident "
                                    "jobs; pass the options themselves")
            if arg.split("=", 1)[0] in SERVER_OPTIONS:
                raise ResidentError(
                    f"field 'args': {arg.split('=', 1)[0]} is set by the server "
                    "(`sekft-resident serve --base ...`); drop it from the job"
                )
        cwd = request.setdefault("cwd", os.getcwd())
        if not isinstance(cwd, str) or not os.path.isabs(cwd):
            raise ResidentError(f"field 'cwd': expected an absolute path, got {cwd!r}")
        if not isinstance(request.setdefault("detach", False), bool):
            raise ResidentError("field 'detach': expected true or false")
    return request


def resolve_paths(args: list[str], cwd: str) -> list[str]:
    """`args` with the values of `PATH_OPTIONS` made absolute against `cwd`.

    Handles both `--out DIR` and `--out=DIR`; other arguments are returned unchanged.
    """
    resolved = []
    expect_path = False
    for arg in args:
        name, eq, value = arg.partition("=")
        if expect_path:
            arg = os.path.join(cwd, arg)
        elif eq and name in PATH_OPTIONS:
            arg = f"{name}={os.path.join(cwd, value)}"
        resolved.append(arg)
        expect_path = not expect_path and arg in PATH_OPTIONS
    return resolved


def memory_snapshot(device: str = "cpu") -> dict:
    """The server's memory now: resident set, process peak, live tensor count, and on a CUDA
    `device` its allocated, peak and reserved (caching allocator: what nvidia-smi counts) bytes.

    `live_tensors` counts tensors the garbage collector can see; it staying flat from job to
    job is the sharpest sign that nothing (optimizer state, activations) leaks between jobs.
    """
    import torch

    page = os.sysconf("SC_PAGE_SIZE")
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * page
    snapshot = {
        "rss_bytes": rss,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        # type() rather than isinstance(): the latter reads `__class__`, which wakes lazy
        # modules among the objects (and makes them warn).
        "live_tensors": sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor)),
    }
    if torch.device(device).type == "cuda":
        snapshot["cuda_allocated_bytes"] = torch.cuda.memory_allocated(device)
        snapshot["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device)
        snapshot["cuda_reserved_bytes"] = torch.cuda.memory_reserved(device)
    return snapshot


def release_memory() -> None:
    """Return what a finished job freed: Python cycles, then the CUDA caching allocator."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_peak_memory(device: str = "cpu") -> None:
    """Start a job's CUDA peak from here, so its result reports its own, not the server's."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


@dataclass
class Job:
    id: int
    op: str
    args: list[str]
    state: str = "queued"  # queued, running, done, failed, cancelled
    events: list[dict] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    stop_reason: str = ""

    def summary(self) -> dict:
        return {"job": self.id, "op": self.op, "state": self.state, "args": self.args}


@dataclass
class Resident:
    """A loaded base, a job queue and the socket that feeds it.

    Threads: the caller's runs `serve_forever` (accepting connections), one worker runs jobs,
    and one thread per connection reads requests and streams events. `changed` guards every
    field below it and is notified whenever a job gains an event or the queue changes.
    """

    base: Any
    base_name: str
    runners: dict[str, Runner]
    listener: socket.socket
    socket_path: Path
    lock_file: Any
    load_seconds: float
    base_loads: int = 1
    changed: threading.Condition = field(default_factory=threading.Condition)
    jobs: dict[int, Job] = field(default_factory=dict)
    pending: list[Job] = field(default_factory=list)
    running: Job | None = None
    stopping: threading.Event = field(default_factory=threading.Event)
    closed: threading.Event = field(default_factory=threading.Event)
    worker: threading.Thread | None = None
    farewells: list[threading.Event] = field(default_factory=list)

    @property
    def device(self) -> str:
        """Where the base lives, whose CUDA memory the snapshots report (a stand-in base
        without one, as in tests, counts as the CPU)."""
        return getattr(self.base, "device", "cpu")

    # --- jobs -------------------------------------------------------------------------

    def submit(self, op: str, args: list[str]) -> Job:
        with self.changed:
            if self.stopping.is_set():
                raise ResidentError("the server is shutting down; submit to a new one")
            job = Job(id=len(self.jobs) + 1, op=op, args=args)
            self.jobs[job.id] = job
            self.pending.append(job)
            position = len(self.pending) - 1 + (self.running is not None)
            self._emit(job, {"event": "queued", "position": position})
        return job

    def cancel(self, job_id: int, reason: str) -> None:
        with self.changed:
            job = self._job(job_id)
            if job in self.pending:
                self.pending.remove(job)
                job.state = "cancelled"
                self._emit(job, {"event": "cancelled", "reason": reason, "result": None})
            elif job is self.running:
                job.stop_reason = reason
                job.stop.set()

    def _job(self, job_id: int) -> Job:
        if job_id not in self.jobs:
            raise ResidentError(f"no job {job_id}; `sekft-resident status` lists the jobs")
        return self.jobs[job_id]

    def _emit(self, job: Job, event: dict) -> None:
        """Append an event to a job's stream (caller holds `changed`)."""
        job.events.append({"event": event.pop("event"), "job": job.id, **event})
        self.changed.notify_all()

    def _report(self, job: Job) -> Report:
        def report(line: str, **fields: Any) -> None:
            with self.changed:
                self._emit(job, {"event": "progress", "line": line, **fields})

        return report

    def work(self) -> None:
        """The worker thread: run queued jobs one at a time until shutdown."""
        while True:
            with self.changed:
                while not self.pending and not self.stopping.is_set():
                    self.changed.wait()
                if self.stopping.is_set():
                    return
                job = self.running = self.pending.pop(0)
                job.state = "running"
                self._emit(job, {"event": "started"})
            log(f"job {job.id} ({job.op}) started")
            reset_peak_memory(self.device)
            final = self._run(job)
            # Drop the job's tensors before it counts as finished, so the next job (and a
            # memory reading taken on its result) starts from the same footprint.
            release_memory()
            final["memory"] = memory_snapshot(self.device)
            with self.changed:
                self.running = None
                self._emit(job, final)
            log(f"job {job.id} ({job.op}) {job.state}")

    def _run(self, job: Job) -> dict:
        """Run one job; its terminal event (without memory). Never raises."""
        try:
            result = self.runners[job.op](self.base, job.args, self._report(job), job.stop)
        except SekftError as e:
            job.state = "failed"
            return {"event": "error", "error": type(e).__name__, "message": str(e)}
        except (Exception, SystemExit) as e:
            # A bug in sekft, not bad input: keep the traceback in the server's log, tell
            # the client, and carry on with the next job.
            traceback.print_exc()
            job.state = "failed"
            return {"event": "error", "error": type(e).__name__, "message": f"internal: {e}"}
        if job.stop.is_set():
            job.state = "cancelled"
            return {"event": "cancelled", "reason": job.stop_reason, "result": result}
        job.state = "done"
        return {"event": "result", "result": result}

    def status(self) -> dict:
        memory = memory_snapshot(self.device)
        with self.changed:
            return {
                "event": "status",
                "pid": os.getpid(),
                "base": self.base_name,
                "base_loads": self.base_loads,
                "load_seconds": self.load_seconds,
                "running": self.running.summary() if self.running else None,
                "queued": [j.summary() for j in self.pending],
                "finished": [
                    j.summary() for j in self.jobs.values() if j.state not in ("queued", "running")
                ],
                "memory": memory,
            }

    # --- shutdown ---------------------------------------------------------------------

    def begin_shutdown(self, reason: str) -> None:
        """Cancel queued jobs, ask the running one to stop, and let `serve_forever` return."""
        with self.changed:
            if self.stopping.is_set():
                return
            for job in list(self.pending):
                self.cancel(job.id, reason)
            if self.running is not None:
                self.cancel(self.running.id, reason)
            self.stopping.set()
            self.changed.notify_all()

    # --- connections ------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Accept connections until shutdown, then wait for the running job and clean up."""
        self.worker = threading.Thread(target=self.work, name="sekft-worker", daemon=True)
        self.worker.start()
        self.listener.settimeout(0.2)
        try:
            while not self.stopping.is_set():
                try:
                    conn, _ = self.listener.accept()
                except TimeoutError:
                    continue
                threading.Thread(target=self.serve_connection, args=(conn,), daemon=True).start()
            self.worker.join()
        finally:
            self.listener.close()
            self.socket_path.unlink(missing_ok=True)
            self.lock_file.close()
            self.closed.set()
        # Connection threads are daemons: let those answering `shutdown`, or streaming a job's
        # last events, say so before the process can exit under them.
        with self.changed:
            farewells = list(self.farewells)
        for answered in farewells:
            answered.wait(timeout=5)
        log("stopped")

    def serve_connection(self, conn: socket.socket) -> None:
        """Answer requests on one connection until the client hangs up."""
        with conn, conn.makefile("rb") as reader:
            while True:
                line = reader.readline(MAX_LINE + 1)
                if not line:
                    return
                if not line.endswith(b"\n"):
                    # Cut off by the end of the stream, or longer than we read: answer, then
                    # close, because the rest of the stream cannot be framed.
                    what = "longer than 1 MiB" if len(line) > MAX_LINE else "not ended by \\n"
                    send(conn, error_event(ResidentError(f"request line {what}")))
                    return
                try:
                    request = parse_request(line)
                    keep_going = self.answer(conn, request)
                except ResidentError as e:
                    keep_going = send(conn, error_event(e))
                if not keep_going:
                    return

    def answer(self, conn: socket.socket, request: dict) -> bool:
        """Act on one valid request and stream its reply; False once the client is gone."""
        op = request["op"]
        if op == "status":
            return send(conn, self.status())
        if op == "cancel":
            self.cancel(request["job"], f"cancelled by a client (job {request['job']})")
            return send(conn, {"event": "ok", "job": request["job"]})
        if op == "shutdown":
            answered = threading.Event()
            with self.changed:
                self.farewells.append(answered)
            self.begin_shutdown("server shutdown")
            self.closed.wait()
            still_there = send(conn, {"event": "ok", "job": None})
            answered.set()
            return still_there
        if op == "watch":
            return self.follow(conn, self._job(request["job"]))
        job = self.submit(op, resolve_paths(request["args"], request["cwd"]))
        if request["detach"]:
            return send(conn, job.events[0]) and send(conn, {"event": "ok", "job": job.id})
        return self.follow(conn, job)

    def follow(self, conn: socket.socket, job: Job) -> bool:
        """Stream a job's events, from its first, until its terminal one.

        The stream counts as a farewell: on shutdown the process waits for it, or a client
        following the job that SIGTERM cancelled would see the connection close before the
        job's `cancelled` event (the worker has finished, this daemon thread has not sent it).
        """
        delivered = threading.Event()
        with self.changed:
            self.farewells.append(delivered)
        try:
            return self._stream(conn, job)
        finally:
            delivered.set()
            with self.changed:
                self.farewells.remove(delivered)

    def _stream(self, conn: socket.socket, job: Job) -> bool:
        sent = 0
        while True:
            with self.changed:
                while len(job.events) == sent:
                    self.changed.wait()
                new = job.events[sent:]
            sent += len(new)
            for event in new:
                if not send(conn, event):
                    return False
                if event["event"] in TERMINAL_EVENTS:
                    return True


def send(conn: socket.socket, event: dict) -> bool:
    """Write one event line; False if the client has gone (its job carries on)."""
    try:
        conn.sendall((json.dumps(event) + "\n").encode())
        return True
    except OSError:
        return False


def error_event(error: SekftError, job: int | None = None) -> dict:
    return {"event": "error", "job": job, "error": type(error).__name__, "message": str(error)}


def log(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def acquire_socket(socket_path: Path) -> tuple[socket.socket, Any]:
    """Take `socket_path` for a new server: (listening socket, held lock file).

    A lock file next to the socket, flock-ed for the server's lifetime, tells a live server
    from a stale socket left by one that was killed: the kernel drops the lock when its
    process dies, so a socket without a held lock is removed and reused.
    """
    if len(os.fsencode(socket_path)) > MAX_SOCKET_PATH:
        raise ResidentError(
            f"{socket_path}: socket path longer than {MAX_SOCKET_PATH} bytes; "
            "pass a shorter --socket"
        )
    if socket_path.parent == default_socket_path().parent:
        private_dir(socket_path.parent)
    lock_path = socket_path.with_name(socket_path.name + ".lock")
    lock_file = open(lock_path, "a+")
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.seek(0)
        pid = lock_file.read().strip() or "?"
        lock_file.close()
        raise ResidentError(
            f"{socket_path}: a resident server (pid {pid}) is already serving here; "
            f"stop it with `{PROG} shutdown --socket {socket_path}` or pass another --socket"
        ) from None
    lock_file.truncate(0)
    lock_file.write(f"{os.getpid()}\n")
    lock_file.flush()
    socket_path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # The umask makes the socket 0600 from birth: a chmod after bind would leave a window.
    old_umask = os.umask(0o177)
    try:
        listener.bind(str(socket_path))
    finally:
        os.umask(old_umask)
    listener.listen(16)
    return listener, lock_file


def start(
    base_name: str,
    loader: Callable[[], Any],
    runners: dict[str, Runner],
    socket_path: Path | None = None,
) -> Resident:
    """Take the socket, load the base (the one call to `loader`) and return a server ready
    for `serve_forever`. A second server on the same socket is refused before it loads."""
    socket_path = Path(socket_path or default_socket_path())
    listener, lock_file = acquire_socket(socket_path)
    try:
        began = time.perf_counter()
        base = loader()
        load_seconds = time.perf_counter() - began
    except BaseException:
        listener.close()
        socket_path.unlink(missing_ok=True)
        lock_file.close()
        raise
    return Resident(
        base=base,
        base_name=base_name,
        runners=runners,
        listener=listener,
        socket_path=socket_path,
        lock_file=lock_file,
        load_seconds=load_seconds,
    )


@dataclass
class ResidentBase:
    """The loaded base and how it was loaded; every job runs with these as its base options."""

    base: Any  # sekft.base.Base
    name: str  # as given to `serve --base`: cold runs write it into adapter_config.json
    load_4bit: bool
    device: str
    dtype: str

    def options(self) -> list[str]:
        """The `--base ...` options a cold `sekft-train` / `sekft-eval` would be given."""
        four_bit = ["--load-4bit"] if self.load_4bit else []
        return ["--base", self.name, *four_bit, "--device", self.device, "--dtype", self.dtype]


def load_resident(
    name: str, load_4bit: bool, device: str | None, dtype: str | None
) -> ResidentBase:
    """Load the base as a cold `sekft-train` with the same options would (same defaults:
    CUDA when present, else CPU; `--dtype auto` as `sekft.device.choose_dtype` decides)."""
    import torch

    from sekft.base import load_base
    from sekft.device import choose_dtype, default_device, describe

    torch_device = torch.device(device) if device else default_device()
    torch_dtype, why = choose_dtype(torch_device, dtype or "auto")
    log(describe(torch_device, torch_dtype, why))
    base = load_base(name, torch_dtype, torch_device, load_4bit, compute_dtype=torch_dtype)
    dtype_name = str(torch_dtype).removeprefix("torch.")
    return ResidentBase(base, name, load_4bit, str(torch_device), dtype_name)


def parse_job_options(parse: Callable[[list[str]], Any], argv: list[str], prog: str) -> Any:
    """Run a command's own option parser on a job's arguments, turning argparse's print-and-exit
    into a ConfigError: in the server a SystemExit would end the worker, and the message
    belongs to the client, not the server's stderr."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(captured):
            return parse(argv)
    except SystemExit:
        lines = captured.getvalue().strip().splitlines() or ["bad options"]
        raise ConfigError(f"job options: {lines[-1].removeprefix(f'{prog}: error: ')}") from None


def base_checksum(model: Any) -> str:
    """SHA-256 over every base tensor of `model` (names, dtypes, shapes, bytes), LoRA weights
    excluded: equal before and after any number of jobs, or a job changed the base."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if "lora_" in name:
            continue
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name} {flat.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def train_job(
    resident: ResidentBase, args: list[str], report: Report, stop: threading.Event
) -> dict:
    """A `sekft-train` run with `args` on the resident base.

    The LoRA layers of the previous job are dropped and the trainer attaches fresh ones with
    this job's rank, targets and seed, and makes a fresh optimizer: the adapter equals what
    a cold `sekft-train` with the same options writes.
    """
    from sekft import sft
    from sekft.lora import detach_lora

    cfg = parse_job_options(sft.config_from_args, [*args, *resident.options()], "sekft-train")
    if cfg.full:
        raise ConfigError(
            "--full trains the base itself, which the resident server keeps "
            "unchanged; run `sekft-train --full` on its own"
        )
    if cfg.inspect:
        raise ConfigError("--inspect loads no weights; run `sekft-train --inspect` on its own")
    detach_lora(resident.base.model)
    result = sft.train(cfg, resident.base, stop=stop, report=report)
    val = f", validation loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    return {
        "summary": f"sekft-train: done: {result.steps} steps, loss {result.train_loss:.4f}"
        f"{val}; adapter in {result.out}",
        "out": str(result.out),
        "steps": result.steps,
        "total_steps": result.total_steps,
        "interrupted": result.interrupted,
        "train_loss": result.train_loss,
        "val_loss": result.val_loss,
    }


def eval_policies(resident: ResidentBase, args: argparse.Namespace) -> dict[str, Any]:
    """The runs an eval job asks for, built by `sekft.generate.model_policies` on the
    resident model."""
    from sekft.generate import model_policies

    return model_policies(resident.base, args)


def eval_job(
    resident: ResidentBase, args: list[str], report: Report, stop: threading.Event
) -> dict:
    """A `sekft-eval` run with `args` on the resident base, writing the same outputs.

    Scenarios run in groups of --jobs; a cancel takes effect between groups, and the
    outputs then cover the episodes that ran.
    """
    from sekft import eval as sekft_eval
    from sekft.sandbox import require_bwrap, warn_no_sandbox
    from sekft.scenario import load_scenarios

    opts = parse_job_options(sekft_eval.parse_args, [*args, *resident.options()], "sekft-eval")
    if opts.endpoint:
        raise ConfigError(
            "--endpoint evaluates a served model, not the resident base; run "
            "`sekft-eval --endpoint` on its own"
        )
    if opts.baseline and not opts.adapter:
        raise ConfigError("--baseline compares against --adapter; give --adapter DIR")
    if opts.jobs < 1:
        raise ConfigError(f"--jobs {opts.jobs}: must be at least 1")
    scenarios = load_scenarios(opts.scenarios, None if opts.split == "all" else opts.split)
    if opts.no_sandbox:
        warn_no_sandbox()
    else:
        require_bwrap()
    config = sekft_eval.episode_config(opts)
    policies = eval_policies(resident, opts)
    progress = sekft_eval.SuiteProgress(len(scenarios) * len(policies),
                                        ProgressLine(report=report))
    episodes = []
    for run, policy in policies.items():
        for first in range(0, len(scenarios), opts.jobs):
            if stop.is_set():
                break
            group = scenarios[first : first + opts.jobs]
            episodes += sekft_eval.run_suite(group, lambda s, p=policy: p, config, run,
                                             opts.jobs, progress.episode_done)
    settings = {
        k: v for k, v in vars(opts).items() if isinstance(v, (str, int, float, bool, type(None)))
    }
    runs = sekft_eval.write_outputs(Path(opts.out), episodes, settings)
    lines = [sekft_eval.table(runs)]
    if len(runs) == 2:
        new, old = runs.values()
        lines += ["", "adapter vs base (overall):", *sekft_eval.differences(new, old)]
    lines.append(f"wrote {opts.out}/results.json, transcripts.jsonl, report.html")
    return {"summary": "\n".join(lines), "out": opts.out, "runs": runs}


def stop_on_signals(resident: Resident) -> None:
    """SIGTERM and Ctrl-C shut the server down the graceful way: the running training job
    saves a checkpoint, queued jobs are cancelled, then `serve_forever` returns."""

    def handler(signum: int, frame: Any) -> None:
        log(f"{signal.Signals(signum).name}: stopping after the running job checkpoints")
        resident.begin_shutdown(f"server stopped by {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def serve(
    base: str, load_4bit: bool, device: str | None, dtype: str | None, socket_path: Path
) -> int:
    """`sekft-resident serve`: load `base` once and run jobs until shutdown."""

    def loader() -> ResidentBase:
        log(f"loading {base}{' in 4 bits' if load_4bit else ''}")
        return load_resident(base, load_4bit, device, dtype)

    resident = start(base, loader, {"train": train_job, "eval": eval_job}, socket_path)
    stop_on_signals(resident)
    log(f"loaded in {resident.load_seconds:.1f}s; serving on {resident.socket_path}")
    resident.serve_forever()
    return 0


# --- client ---------------------------------------------------------------------------


def request(socket_path: Path, req: dict) -> Iterator[dict]:
    """Send one request and yield its reply events, the terminal one last."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(socket_path))
    except (FileNotFoundError, ConnectionRefusedError):
        conn.close()
        raise ResidentError(
            f"no resident server at {socket_path}; start one with `{PROG} serve --base BASE`"
        ) from None
    with conn, conn.makefile("rb") as reader:
        conn.sendall((json.dumps(req) + "\n").encode())
        for line in reader:
            event = json.loads(line)
            yield event
            if event["event"] in TERMINAL_EVENTS:
                return
    raise ResidentError(
        f"the server at {socket_path} closed the connection before answering; see its log"
    )


def print_job_events(events: Iterator[dict]) -> int:
    """Print a job's reply like the non-resident commands print their run; the exit code.

    Progress lines go to stdout as the job streams them; queue and start notices go to
    stderr; a failed or cancelled job raises, so `run_cli` prints one line and exits 1.
    """
    for event in events:
        kind, job = event["event"], event["job"]
        if kind == "queued":
            log(f"job {job} queued ({event['position']} ahead)")
        elif kind == "started":
            log(f"job {job} started")
        elif kind == "progress":
            print(event["line"], flush=True)
        elif kind == "ok":
            log(f"job {job} runs detached; follow it with `{PROG} watch {job}`")
        elif kind == "result":
            result = event["result"]
            print(result.get("summary") or json.dumps(result), flush=True)
        elif kind == "cancelled":
            raise ResidentError(f"job {job} cancelled: {event['reason']}")
        elif kind == "error":
            where = f"job {job}: " if job is not None else ""
            raise ResidentError(f"{where}{event['error']}: {event['message']}")
    return 0


def print_status(status: dict) -> None:
    memory = status["memory"]
    print(
        f"base {status['base']} (pid {status['pid']}, loaded {status['base_loads']}x in "
        f"{status['load_seconds']:.1f}s, rss {memory['rss_bytes'] / 2**20:.0f} MiB)"
    )
    running = [status["running"]] if status["running"] else []
    for job in [*running, *status["queued"], *status["finished"]]:
        print(f"  job {job['job']:>4}  {job['op']:<5}  {job['state']:<9}  {' '.join(job['args'])}")


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Keep a base loaded and run sekft-train/sekft-eval jobs on it."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    socket_help = f"Unix socket (default {default_socket_path()})"

    serve = commands.add_parser("serve", help="load a base and serve jobs")
    serve.add_argument("--base", required=True, help="checkpoint folder or hub id (offline)")
    serve.add_argument("--load-4bit", action="store_true", help="load the base in NF4")
    serve.add_argument("--device", help="cuda, cpu, ... (default: cuda if present)")
    serve.add_argument(
        "--dtype",
        choices=("auto", "bfloat16", "float16", "float32"),
        default="auto",
        help="of the base weights (default: auto, bf16 where the device has native bf16)",
    )
    serve.add_argument("--socket", type=Path, help=socket_help)

    submit = commands.add_parser(
        "submit", help="queue a job; other options go to sekft-train / sekft-eval"
    )
    submit.add_argument("op", choices=JOB_OPS)
    submit.add_argument("--detach", action="store_true", help="queue and return at once")
    submit.add_argument("--socket", type=Path, help=socket_help)

    for name, text in (("status", "list jobs"), ("shutdown", "stop the server")):
        command = commands.add_parser(name, help=text)
        command.add_argument("--socket", type=Path, help=socket_help)
    for name, text in (("cancel", "cancel a job"), ("watch", "follow a job")):
        command = commands.add_parser(name, help=text)
        command.add_argument("job", type=int)
        command.add_argument("--socket", type=Path, help=socket_help)

    # Unknown options belong to the job (`submit train --data d --out o`); anywhere else
    # they are mistakes, reported by argparse as usual.
    args, job_args = parser.parse_known_args(argv)
    if job_args and args.command != "submit":
        parser.error(f"unrecognized arguments: {' '.join(job_args)}")
    return args, job_args


def terminal(events: Iterator[dict]) -> dict:
    """The terminal event of a reply to status, cancel or shutdown; raises on an error."""
    *_, event = events
    if event["event"] == "error":
        raise ResidentError(event["message"])
    return event


def cli(argv: list[str] | None) -> int:
    args, job_args = parse_args(argv)
    socket_path = args.socket or default_socket_path()
    if args.command == "serve":
        return serve(args.base, args.load_4bit, args.device, args.dtype, socket_path)
    if args.command == "submit":
        req = {"op": args.op, "args": job_args, "cwd": os.getcwd(), "detach": args.detach}
        return print_job_events(request(socket_path, req))
    if args.command == "watch":
        return print_job_events(request(socket_path, {"op": "watch", "job": args.job}))
    if args.command == "status":
        print_status(terminal(request(socket_path, {"op": "status"})))
    elif args.command == "cancel":
        terminal(request(socket_path, {"op": "cancel", "job": args.job}))
        log(f"job {args.job}: cancel requested")
    else:
        terminal(request(socket_path, {"op": "shutdown"}))
        log("server stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(PROG, cli, argv)


if __name__ == "__main__":
    sys.exit(main())

"""Time to first training step: N jobs through one resident server vs N cold `sekft-train` runs.

    .venv/bin/python bench/resident.py [--base DIR] [--jobs 3] [--load-4bit] [--max-len 512]

Both sides train the same LoRA on the same sessions, one optimizer step per job (a job's
first step is what a short run waits for). Cold: each job is a fresh process doing what
`sekft-train` does (with the server's threads; see `cold_worker`); the clock runs from
its spawn to the end of its first step, and the base load inside it is timed on its own.
Resident: one `sekft-resident serve` process loads the base (its start, spawn to first
answer, is paid once and counted), then each job's clock runs from submitting the request
to the end of its first step; its load time is zero by construction. Cold and resident jobs
alternate. Reported as a ratio in the same run: the N cold runs' total against the server
start plus the N resident jobs, and the steady-state ratio per job; with the server's RSS
and live tensor count after each job (flat = no growth).

The base defaults to bench/checkpoints/random-135m (SmolLM2-135M-shaped, bf16), written by
bench/load.py's `make_checkpoint` if missing. The checkpoint files are read once first, so
every process finds them in the page cache. Results go to bench/results/resident.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from sekft import resident

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DEFAULT_BASE = ROOT / "bench" / "checkpoints" / "random-135m"


def write_sessions(folder: Path, n: int) -> Path:
    """Shell-like sessions: short commands (trained) and longer outputs (not trained)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "sessions.jsonl", "w") as f:
        for i in range(n):
            listing = "\n".join(
                f"-rw-r--r-- 1 user user {100 * j + i} file{j}.txt" for j in range(8)
            )
            messages = [
                {"role": "user", "content": "Welcome.\nuser@box:~$ "},
                {"role": "assistant", "content": "ls -la"},
                {"role": "user", "content": f"total {i}\n{listing}\nuser@box:~$ "},
                {"role": "assistant", "content": f"wc -l file{i % 8}.txt"},
                {"role": "user", "content": f"{i} file{i % 8}.txt\nuser@box:~$ "},
                {"role": "assistant", "content": "exit"},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return folder


def warm_page_cache(base: Path) -> None:
    for file in sorted(base.glob("*.safetensors")):
        with open(file, "rb") as f:
            while f.read(1 << 24):
                pass


def cold_worker(started: float, argv: list[str]) -> dict:
    """In a fresh process: what `sekft-train argv` does, timing the imports, the base load and
    the first step (each from the parent's spawn, but the load on its own).

    The threads mirror the server's: the base loads in the main thread and training runs in
    another. On this busy 2-core machine, torch ops run several times slower in the thread
    that first used torch than in a later one (a 135M forward: 21s vs 3s), so a cold run
    training where it loaded would credit the server with a speedup loading has no part in.
    """
    timings: dict = {"python_seconds": time.time() - started}
    from sekft import sft

    timings["imports_seconds"] = time.time() - started
    cfg = sft.config_from_args(argv)
    device, dtype, _ = sft.resolve_device_dtype(cfg)
    began = time.time()
    base = sft.load_base(cfg.base, dtype, device, cfg.load_4bit, compute_dtype=dtype)
    timings["load_seconds"] = time.time() - began

    def report(line: str, **fields) -> None:
        # The trainer's first line comes once data, LoRA and optimizer are ready.
        timings.setdefault("ready_seconds", time.time() - started)
        if line.startswith("step 1/") and "first_step_seconds" not in timings:
            timings["first_step_seconds"] = time.time() - started

    run = threading.Thread(target=sft.train, args=(cfg, base), kwargs={"report": report})
    run.start()
    run.join()
    return timings


def run_cold(job_args: list[str]) -> dict:
    started = time.time()
    out = subprocess.run(
        [sys.executable, __file__, "--cold-worker", str(started), "--", *job_args],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.splitlines()[-1])


def start_server(base: Path, load_4bit: bool, socket_path: Path) -> tuple[subprocess.Popen, dict]:
    """Spawn `sekft-resident serve`; (process, its status), once it answers."""
    cmd = [sys.executable, "-m", "sekft.resident", "serve", "--base", str(base)]
    started = time.time()
    server = subprocess.Popen(
        [*cmd, "--socket", str(socket_path), *(["--load-4bit"] if load_4bit else [])],
        cwd=ROOT,
        stderr=subprocess.DEVNULL,
    )
    # The socket exists while the base loads; connections wait until it is served.
    while not socket_path.exists():
        if server.poll() is not None:
            raise SystemExit("bench: the resident server exited before serving")
        time.sleep(0.05)
    status = next(resident.request(socket_path, {"op": "status"}))
    status["start_seconds"] = time.time() - started
    return server, status


def run_resident_job(socket_path: Path, args: list[str]) -> dict:
    began, ready, first_step, final = time.time(), None, None, None
    for event in resident.request(socket_path, {"op": "train", "args": args}):
        if ready is None and event["event"] == "progress":
            ready = time.time() - began
        if first_step is None and event.get("line", "").startswith("step 1/"):
            first_step = time.time() - began
        final = event
    if final["event"] != "result":
        raise SystemExit(f"bench: resident job failed: {final}")
    return {
        "first_step_seconds": first_step,
        "ready_seconds": ready,
        "load_seconds": 0.0,
        "rss_bytes": final["memory"]["rss_bytes"],
        "live_tensors": final["memory"]["live_tensors"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE)
    parser.add_argument("--jobs", type=int, default=3, help="N jobs on each side")
    parser.add_argument("--load-4bit", action="store_true", help="NF4 base (needs CUDA)")
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--cold-worker", type=float, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.cold_worker is not None:
        print(json.dumps(cold_worker(args.cold_worker, [a for a in rest if a != "--"])))
        return 0

    if not args.base.exists() and args.base == DEFAULT_BASE:
        sys.path.insert(0, str(ROOT / "bench"))
        from load import make_checkpoint

        print("writing the random 135m checkpoint ...", flush=True)
        make_checkpoint("135m")
    warm_page_cache(args.base)
    work = Path(tempfile.mkdtemp(prefix="sekft-bench-resident-"))
    data = write_sessions(work / "data", args.sessions)
    common = ["--data", str(data), "--max-steps", "1", "--max-len", str(args.max_len)]
    common += ["--batch-tokens", str(args.max_len), "--val-fraction", "0", "--overwrite"]
    four_bit = ["--load-4bit"] if args.load_4bit else []

    socket_path = Path(tempfile.mkdtemp(prefix="sekft-bench-", dir="/tmp")) / "r.sock"
    server, status = start_server(args.base, args.load_4bit, socket_path)
    print(
        f"resident server start: {status['start_seconds']:.2f}s to serving "
        f"(load {status['load_seconds']:.2f}s)",
        flush=True,
    )
    # Cold and resident jobs alternate, so load from other processes on the machine
    # falls on both sides alike.
    cold, hot = [], []
    try:
        for i in range(args.jobs):
            job = [*common, "--out", str(work / f"cold-{i}"), "--seed", str(i)]
            cold.append(run_cold([*job, "--base", str(args.base), *four_bit]))
            row = cold[-1]
            print(
                f"cold job {i + 1}: {row['first_step_seconds']:.2f}s to first step "
                f"(python {row['python_seconds']:.2f}s, imports {row['imports_seconds']:.2f}s, "
                f"load {row['load_seconds']:.2f}s, ready {row['ready_seconds']:.2f}s)",
                flush=True,
            )
            job = [*common, "--out", str(work / f"res-{i}"), "--seed", str(i)]
            hot.append(run_resident_job(socket_path, job))
            row = hot[-1]
            print(
                f"resident job {i + 1}: {row['first_step_seconds']:.2f}s to first step "
                f"(load 0s, ready {row['ready_seconds']:.2f}s), "
                f"server rss {row['rss_bytes'] / 2**20:.0f} MiB, "
                f"{row['live_tensors']} live tensors",
                flush=True,
            )
        list(resident.request(socket_path, {"op": "shutdown"}))
    finally:
        if server.poll() is None:
            server.terminate()
        server.wait()

    cold_total = sum(r["first_step_seconds"] for r in cold)
    hot_total = status["start_seconds"] + sum(r["first_step_seconds"] for r in hot)
    cold_mean = cold_total / args.jobs
    hot_mean = sum(r["first_step_seconds"] for r in hot) / args.jobs
    summary = {
        "base": str(args.base),
        "jobs": args.jobs,
        "load_4bit": args.load_4bit,
        "cold": cold,
        "resident_server": {k: status[k] for k in ("start_seconds", "load_seconds")},
        "resident": hot,
        "cold_total_seconds": cold_total,
        "resident_total_seconds": hot_total,
        "speedup_total": cold_total / hot_total,
        "speedup_per_job": cold_mean / hot_mean,
    }
    print(
        f"\n{args.jobs} jobs, time to first step: cold {cold_total:.1f}s, resident "
        f"{hot_total:.1f}s including the server start: {summary['speedup_total']:.2f}x; "
        f"per job once the server is up: {summary['speedup_per_job']:.1f}x"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "resident.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

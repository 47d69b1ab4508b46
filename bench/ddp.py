"""Data-parallel throughput: tokens/s of `torchrun --nproc-per-node 2` against one process,
on the same global batch, as a ratio measured in one run.

    .venv/bin/python bench/ddp.py [--base DIR] [--steps 3] [--rounds 1] [--batch-tokens 512]

Both sides run `sekft.sft` on the same synthetic shell sessions, seed and `--batch-tokens`,
so they take the same optimizer steps (their logged losses are checked to agree): one
process with all `--threads`, two gloo ranks on the CPU with half the threads each, each
rank training half of every step's packed rows, and one process with half the threads (what
each rank has). Tokens/s counts the steps after the first
(warm-up) from each run's metrics.jsonl; the sides alternate `--rounds` times and each keeps
its best round, since neighbours on a shared machine move wall time a lot.

On a CPU the two ranks share the cores the single process already uses, so the ratio shows
the cost of data parallelism (each rank's own copy of the base, smaller per-rank matrix
products, the gradient all-reduce and the step's barrier), not a speed-up. With one GPU per
rank the compute splits over devices and the ratio approaches the number of ranks, less
the all-reduce of the LoRA gradients; that was not measured here.

--base defaults to a random SmolLM2-135M-shaped checkpoint (as bench/train.py builds it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from train import make_checkpoint  # bench/train.py, beside this script

WORDS = ("ls", "cat", "grep", "-rn", "TODO", "src", "find", ".", "-name", "*.log", "wc", "-l",
         "notes.txt", "total", "drwxr-xr-x", "user", "4096", "No", "such", "file", "done")


def write_sessions(path: Path, n: int, seed: int = 0) -> Path:
    """`n` shell sessions of 2-6 turns as JSONL training data."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            messages = [{"role": "user", "content": "Tidy the logs, then report."}]
            for _ in range(rng.randint(2, 6)):
                messages.append({"role": "assistant",
                                 "content": " ".join(rng.choices(WORDS, k=rng.randint(3, 8)))})
                messages.append({"role": "user",
                                 "content": " ".join(rng.choices(WORDS, k=rng.randint(20, 60)))})
            messages.append({"role": "assistant", "content": "exit"})
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def run(ranks: int, threads: int, train_args: list[str], out: Path) -> list[dict]:
    """One training run on `ranks` processes of `threads` threads each; its metrics."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if ranks == 1:
        cmd = [sys.executable, "-m", "sekft.sft"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={ranks}", "-m", "sekft.sft"]
    done = subprocess.run([*cmd, *train_args, "--out", str(out), "--overwrite"], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"bench/ddp.py: the {ranks}-rank run failed:\n{done.stderr[-2000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").open()]


def tokens_per_s(metrics: list[dict]) -> float:
    """Tokens of the steps after the first, over their wall time."""
    tokens = sum(m["tokens"] for m in metrics[1:])
    return tokens / (metrics[-1]["elapsed"] - metrics[0]["elapsed"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=Path)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/sekft-bench/smollm2-135m"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--batch-tokens", type=int, default=512)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    base = args.base or make_checkpoint(args.cache)
    with tempfile.TemporaryDirectory(prefix="sekft-bench-ddp-") as tmp:
        tmp = Path(tmp)
        data = write_sessions(tmp / "data.jsonl", 200)
        train_args = ["--base", str(base), "--data", str(data), "--device", "cpu",
                      "--dtype", "float32", "--max-steps", str(args.steps),
                      "--batch-tokens", str(args.batch_tokens), "--max-len", str(args.max_len),
                      "--val-fraction", "0", "--dropout", "0"]
        # (ranks, threads per rank): one process on every thread, two ranks splitting them,
        # and one process on one thread (what each rank has).
        half = max(1, args.threads // 2)
        sides = list(dict.fromkeys([(1, args.threads), (2, half), (1, half)]))
        best = dict.fromkeys(sides, 0.0)
        losses = {}
        for round_ in range(args.rounds):
            for ranks, threads in sides:
                metrics = run(ranks, threads, train_args, tmp / "out")
                rate = tokens_per_s(metrics)
                best[ranks, threads] = max(best[ranks, threads], rate)
                losses[ranks, threads] = [m["loss"] for m in metrics]
                print(f"round {round_ + 1}: {ranks} rank(s) x {threads} thread(s): "
                      f"{rate:.1f} tokens/s", flush=True)
    reference = losses[sides[0]]
    same = all(abs(a - b) <= 1e-4 * abs(a)
               for side in sides for a, b in zip(reference, losses[side], strict=True))
    whole, split = best[1, args.threads] or 1e-9, best[2, half]
    per_rank = best[1, half] or 1e-9
    print(json.dumps({"cpu": _cpu(), "threads": args.threads, "batch_tokens": args.batch_tokens,
                      "steps": args.steps,
                      "tokens_per_s": {f"{r}x{t}": round(v, 2) for (r, t), v in best.items()},
                      "ratio_2_ranks_to_1_process": round(split / whole, 3),
                      "ratio_2_ranks_to_1_process_1_rank_threads": round(split / per_rank, 3),
                      "same_losses": same}))
    print(f"2 ranks x {half} thread(s) / 1 process x {args.threads}: {split / whole:.2f}x "
          f"tokens/s on the same global batch (losses {'agree' if same else 'DIFFER'}); "
          f"/ 1 process x {half}: {split / per_rank:.2f}x.")
    print(f"On a CPU the ranks split the cores one process already uses ({args.threads} here), "
          "so data parallelism can only add overhead (a base per rank, smaller matrix "
          "products, the all-reduce), not speed: with one GPU per rank the ratio approaches "
          "the number of ranks (not measured here).")
    if whole < per_rank:
        print(f"Here 1 process x {args.threads} threads ran slower than x {half}: other work "
              "holds the cores and the threads of one process wait for each other, so the "
              "first ratio measures that contention, not data parallelism. The second compares "
              "ranks and a process of the same thread count, but on a shared machine two "
              "processes also get more of the scheduler's time: neither is a clean overhead "
              "figure here.")
    return 0 if same else 1


def _cpu() -> str:
    """The CPU's model name (Linux), else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


if __name__ == "__main__":
    sys.exit(main())

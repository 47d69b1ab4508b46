"""Training-step throughput and peak memory: sekft against transformers + peft, in one run.

    .venv/bin/python bench/train.py [--base DIR] [--len 512] [--batch 2] [--steps 3] [--rounds 2]
                                    [--dtype auto|float32|bfloat16]

Both sides run on the CPU (a CUDA comparison is not written yet) and train the same LoRA
(rank 16, alpha 32, q/k/v/o/gate/up/down, no dropout) with AdamW on the same token rows:
`--batch` rows of `--len` tokens, each row several packed shell sessions in which only the
commands train (`--trained`, default 20% of tokens, in short runs between long outputs, as
in real trajectories). sekft runs its own loop's step
(`model.hidden` with document ids, the trained-positions loss, backward, AdamW);
transformers + peft runs the usual `model(input_ids, labels=...)` step on the same rows.

`--dtype` applies to both sides; `auto` (the default) gives each side the best dtype of this
machine by sekft's policy (`sekft.device`: bf16 where the CPU multiplies bf16 natively, AMX or
avx512_bf16, else float32). In bf16 both sides load the frozen weights in bf16 and step under
CPU autocast, with float32 LoRA weights (peft's `autocast_adapter_dtype`, sekft's own), as
accelerate's bf16 mixed precision does. When the choice is bf16, a `sekft float32` side runs
too, for sekft's own bf16/float32 step ratio. The CPU's model and flags are printed with the
results, and every step's RSS: flat from step to step, or memory grows.

Each configuration runs in a fresh process, so its peak RSS is its own; results are printed
as a table and as JSON, with ratios against transformers + peft measured in the same run.
Speed is reported three ways: mean tokens/s, the best step's tokens/s (the ratio column), and
tokens per CPU-second; `--rounds N` alternates the sides N times and keeps each side's best
round. On a machine shared with other work the neighbours' load moves wall time by 2x within
minutes, so read the ratios of one run, never absolute figures across runs.
A profile of one sekft step (top operators by self CPU time) says where the time goes, and
a ceiling says how far any exact implementation could go: the matmuls the step cannot skip
(`necessary_matmul_flops`) at the best rate this CPU's GEMM reaches, alone and plus the
measured attention kernel time, against transformers + peft's best step.

--base defaults to a random SmolLM2-135M-shaped checkpoint (as `bench/load.py
--make-checkpoint` writes), built once with transformers into --cache.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

from load import SHAPES  # bench/load.py, beside this script

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# SmolLM2-135M's shape, the one bench/load.py writes (HuggingFaceTB/SmolLM2-135M-Instruct).
SMOLLM2_135M = dict(SHAPES["135m"], bos_token_id=1, eos_token_id=2)


# SmolLM2's real tokenizer and template, copied into the repo's test fixtures.
TOKENIZER = Path(__file__).resolve().parent.parent / "tests/fixtures/templates/smollm2"


def make_checkpoint(folder: Path) -> Path:
    """A random float32 SmolLM2-135M-shaped llama checkpoint in `folder`, with SmolLM2's
    tokenizer files (the loader reads them with the weights)."""
    import shutil

    import torch
    import transformers

    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        config = transformers.LlamaConfig(**SMOLLM2_135M)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(folder)
    for f in TOKENIZER.iterdir():
        shutil.copyfile(f, folder / f.name)
    return folder


def make_rows(batch: int, length: int, vocab: int, trained: float, seed: int = 0):
    """`batch` rows of `length` tokens: (input_ids, labels, doc_ids) as lists.

    Each row packs sessions of 100-300 tokens; within a session, commands of 4-16 tokens
    train and are followed by outputs long enough that `trained` of all tokens train.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(batch):
        ids, labels, docs = [], [], []
        doc = 0
        while len(ids) < length:
            n = min(rng.randint(100, 300), length - len(ids))
            session_labels = [-100] * n
            k = rng.randint(4, 12)
            while k < n:
                command = rng.randint(4, 16)
                for j in range(k, min(k + command, n)):
                    session_labels[j] = 0
                k += command + int(command * (1 - trained) / trained)
            session_ids = [rng.randrange(3, vocab) for _ in range(n)]
            ids += session_ids
            pairs = zip(session_ids, session_labels, strict=True)
            labels += [t if y == 0 else -100 for t, y in pairs]
            docs += [doc] * n
            doc += 1
        rows.append((ids, labels, docs))
    return rows


def necessary_matmul_flops(config, tokens: int, trained: int) -> int:
    """A lower bound on the matmul FLOPs of one exact LoRA training step over `tokens` tokens
    of which `trained` train: the frozen projections and the lm_head only, the LoRA matmuls
    and attention scores not counted.

    Forward: every projection at every position, except that the last block's q, o and MLP
    matter only at trained positions, as does the lm_head. Backward: the same products again
    for the input gradient (frozen weights need no weight gradient), except block 0's q/k/v/
    gate/up, whose inputs lead only to frozen weights.
    """
    h, i = config.hidden_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    qo, kv_size, mlp = 2 * h * q, 2 * h * kv, 3 * h * i  # multiply-adds per position
    layer = qo + kv_size + mlp
    last = tokens * kv_size + trained * (qo + mlp)
    forward = (config.num_layers - 1) * tokens * layer + last + trained * h * config.vocab_size
    first_inputs = tokens * (h * q + kv_size + 2 * h * i)  # block 0: q, k, v, gate, up
    backward = forward - first_inputs
    return 2 * (forward + backward)


def gemm_flops_per_s(config, threads: int, dtype: str, seconds: float = 1.0) -> float:
    """This CPU's GEMM rate in `dtype` on the step's largest product ([512, hidden] @ [hidden,
    intermediate]), best of repeated timings."""
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(512, config.hidden_size, dtype=getattr(torch, dtype))
    b = torch.randn(config.hidden_size, config.intermediate_size, dtype=getattr(torch, dtype))
    best, started = float("inf"), time.perf_counter()
    while time.perf_counter() - started < seconds:
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] / best


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def cpu_description() -> str:
    """The CPU's model name, its matmul-relevant flags and torch's kernel capability."""
    import torch

    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    wanted = ["avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"]
    have = ", ".join(f for f in wanted if f in flags) or "none of " + ", ".join(wanted)
    return (f"{model}; flags: {have}; torch CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}")


def worker_sekft(args) -> dict:
    import torch

    from sekft.base import load_base
    from sekft.device import autocast
    from sekft.lora import attach_lora, lora_parameters
    from sekft.loss import trained_token_loss
    from sekft.pack import Example, collate_row

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    base = load_base(args.base, dtype=dtype, device="cpu", load_4bit=args.four_bit)
    model = base.model
    attach_lora(model, 16, 32.0, 0.0, TARGETS)
    model.grad_ckpt = args.grad_ckpt
    params = list(lora_parameters(model).values())
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    rows = []
    for ids, labels, docs in make_rows(args.batch, args.len, base.config.vocab_size, args.trained):
        # The row's sessions back as Examples, so collate_row packs them as the trainer does.
        bounds = [0] + [i for i in range(1, len(docs)) if docs[i] != docs[i - 1]] + [len(docs)]
        spans = zip(bounds, bounds[1:], strict=False)
        sessions = [Example(ids[a:b], labels[a:b]) for a, b in spans]
        rows.append(collate_row(sessions))
    n_trained = sum(r.n_trained for r in rows)
    model.train()

    def step(timings: dict | None = None) -> None:
        for row in rows:
            t0 = time.perf_counter()
            with autocast("cpu", dtype):
                hidden = model.hidden(row.input_ids, row.position_ids, row.doc_ids)
            t1 = time.perf_counter()
            loss, _ = trained_token_loss(hidden, model.output_weight(), row.labels)
            t2 = time.perf_counter()
            (loss / n_trained).backward()
            t3 = time.perf_counter()
            if timings is not None:
                timings["forward"] += t1 - t0
                timings["loss"] += t2 - t1
                timings["backward"] += t3 - t2
        t4 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if timings is not None:
            timings["optimizer"] += time.perf_counter() - t4

    tokens = sum(r.input_ids.numel() for r in rows)
    result = measure(step, args, tokens, profile=True)
    result["necessary_matmul_flops"] = necessary_matmul_flops(base.config, tokens, n_trained)
    result["gemm_flops_per_s"] = gemm_flops_per_s(base.config, args.threads, args.dtype)
    return result


def worker_hf(args) -> dict:
    import peft
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    kwargs = {}
    if args.four_bit:
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )  # fmt: skip
    # On the CPU like sekft's side, even where CUDA is present (transformers would put a
    # 4-bit model on the GPU by default).
    model = transformers.AutoModelForCausalLM.from_pretrained(
        args.base, dtype=dtype, device_map={"": "cpu"}, **kwargs
    )
    if args.grad_ckpt:
        model.gradient_checkpointing_enable()
    config = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                             task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    rows = make_rows(args.batch, args.len, model.config.vocab_size, args.trained)
    input_ids = torch.tensor([r[0] for r in rows])
    labels = torch.tensor([r[1] for r in rows])
    model.train()

    def step(timings: dict | None = None) -> None:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return measure(step, args, input_ids.numel(), profile=False)


def measure(step, args, tokens_per_step: int, profile: bool) -> dict:
    import torch

    step()  # warm-up: allocator, kernels, optimizer state
    timings = {"forward": 0.0, "loss": 0.0, "backward": 0.0, "optimizer": 0.0}
    started, cpu_started = time.perf_counter(), time.process_time()
    step_times, rss = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step(timings)
        step_times.append(time.perf_counter() - t0)
        rss.append(current_rss())
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    result = {
        "tokens_per_s": tokens_per_step * args.steps / elapsed,
        # The fastest step: least disturbed by whatever else the machine runs.
        "best_tokens_per_s": tokens_per_step / min(step_times),
        # Per CPU-second too: on a machine shared with other work, wall time measures the
        # neighbours as much as the code.
        "tokens_per_cpu_s": tokens_per_step * args.steps / cpu,
        "peak_rss": peak_rss(),
        "step_s": elapsed / args.steps,
        "best_step_s": min(step_times),
        "rss_per_step": rss,
    }
    if profile:
        result["phases_s"] = {k: v / args.steps for k, v in timings.items()}
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step()
        averages = prof.key_averages()
        result["profile"] = averages.table(sort_by="self_cpu_time_total", row_limit=12)
        # Attention is necessary work too; its kernel's own time (microseconds in the profile).
        result["attention_s"] = sum(
            e.self_cpu_time_total for e in averages if "scaled_dot_product" in e.key
        ) / 1e6
    return result


def run_worker(args, side: str, four_bit: bool, grad_ckpt: bool, dtype: str) -> dict:
    cmd = [
        sys.executable, __file__, "--worker", side, "--base", str(args.base),
        "--len", str(args.len), "--batch", str(args.batch), "--steps", str(args.steps),
        "--trained", str(args.trained), "--threads", str(args.threads), "--dtype", dtype,
    ]  # fmt: skip
    if four_bit:
        cmd.append("--four-bit")
    if grad_ckpt:
        cmd.append("--grad-ckpt")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=Path)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/sekft-bench/smollm2-135m"))
    parser.add_argument("--len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--trained", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=["lora", "4bit"], help="run one configuration")
    parser.add_argument("--rounds", type=int, default=1, help="alternate the sides N times")
    parser.add_argument("--no-grad-ckpt", action="store_true", help="skip the --grad-ckpt side")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="both sides' dtype (default: auto, each side's best here)")
    parser.add_argument("--worker", choices=["sekft", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--four-bit", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--grad-ckpt", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = (worker_sekft if args.worker == "sekft" else worker_hf)(args)
        print(json.dumps(result))
        return 0

    from sekft.device import choose_dtype

    args.base = args.base or make_checkpoint(args.cache)
    dtype, why = choose_dtype("cpu", args.dtype)
    dtype = str(dtype).removeprefix("torch.")
    configs = [("lora", False), ("4bit", True)]
    sides = [("transformers+peft", "hf", False, dtype), ("sekft", "sekft", False, dtype)]
    if dtype != "float32":
        sides.append(("sekft float32", "sekft", False, "float32"))
    if not args.no_grad_ckpt:
        sides.append(("sekft --grad-ckpt", "sekft", True, dtype))
    results: dict[str, dict[str, dict]] = {}
    for name, four_bit in configs:
        if args.only and args.only != name:
            continue
        results[name] = {}
        # Sides alternate, round after round, and each keeps its best round: on a shared
        # machine the neighbours' load shifts over minutes, and alternating spreads it evenly.
        for _ in range(args.rounds):
            for label, worker, grad_ckpt, side_dtype in sides:
                r = run_worker(args, worker, four_bit, grad_ckpt, side_dtype)
                best = results[name].get(label)
                if best is None or "error" in best or (
                    "error" not in r and r["best_tokens_per_s"] > best["best_tokens_per_s"]
                ):
                    results[name][label] = r

    print(f"base {args.base}, len {args.len}, batch {args.batch}, {args.trained:.0%} trained, "
          f"{args.threads} threads, {args.steps} steps")
    print(f"CPU: {cpu_description()}")
    print(f"dtype: {dtype} for both sides ({why})")
    print(f"{'config':<8} {'side':<20} {'tok/s':>8} {'best':>8} {'tok/cpu-s':>10} "
          f"{'peak RSS':>10} {'x best':>7} {'x cpu':>6} {'x mem':>6}")
    for name, sides in results.items():
        hf = sides["transformers+peft"]
        for side, r in sides.items():
            if "error" in r:
                print(f"{name:<8} {side:<20} error: {r['error']}")
                continue
            speed = cpu = mem = ""
            if "error" not in hf:
                speed = f"{r['best_tokens_per_s'] / hf['best_tokens_per_s']:.2f}"
                cpu = f"{r['tokens_per_cpu_s'] / hf['tokens_per_cpu_s']:.2f}"
                mem = f"{r['peak_rss'] / hf['peak_rss']:.2f}"
            print(f"{name:<8} {side:<20} {r['tokens_per_s']:8.1f} {r['best_tokens_per_s']:8.1f} "
                  f"{r['tokens_per_cpu_s']:10.1f} {r['peak_rss'] / 2**30:8.2f}GB {speed:>7} "
                  f"{cpu:>6} {mem:>6}")
    for name, sides in results.items():
        for side, r in sides.items():
            if "rss_per_step" in r:
                steps = " -> ".join(f"{b / 2**30:.2f}" for b in r["rss_per_step"])
                print(f"{name} {side}: RSS after each step (GB): {steps}")
        f32 = sides.get("sekft float32", {})
        if "error" not in sides["sekft"] and "best_tokens_per_s" in f32:
            print(f"{name}: sekft {dtype} step is "
                  f"{sides['sekft']['best_tokens_per_s'] / f32['best_tokens_per_s']:.2f}x its "
                  "float32 step (best steps)")
    for name, sides in results.items():
        ours, hf = sides["sekft"], sides["transformers+peft"]
        if "necessary_matmul_flops" in ours and "error" not in hf:
            # The ceiling: an implementation whose step were nothing but the matmuls exactness
            # requires, each at this CPU's best GEMM rate.
            floor_s = ours["necessary_matmul_flops"] / ours["gemm_flops_per_s"]
            flops, rate = ours["necessary_matmul_flops"] / 1e9, ours["gemm_flops_per_s"] / 1e9
            hf_s, attention_s = hf["best_step_s"], ours["attention_s"]
            rest = ours["best_step_s"] - floor_s - attention_s
            print(f"\n{name}: transformers+peft's best step took {hf_s:.2f} s; 2x needs a step "
                  f"of {hf_s / 2:.2f} s. The matmuls no exact step can skip ({flops:.0f} GFLOP) "
                  f"take {floor_s:.2f} s at this CPU's best {dtype} GEMM rate "
                  f"({rate:.0f} GFLOP/s); sekft's step runs at {floor_s / ours['best_step_s']:.0%} "
                  f"of that speed, transformers+peft's at {floor_s / hf_s:.0%}. "
                  f"Ceiling {hf_s / floor_s:.2f}x. With PyTorch's attention kernel as measured "
                  f"({attention_s:.2f} s): {hf_s / (floor_s + attention_s):.2f}x, leaving "
                  f"{hf_s / 2 - floor_s - attention_s:.2f} s for everything else (LoRA products, "
                  f"norms, RoPE, SwiGLU, loss, optimizer, 4-bit dequantization), which takes "
                  f"sekft {rest:.2f} s of its {ours['best_step_s']:.2f} s step (its GEMMs' "
                  "shortfall from the best rate included).")
        if "phases_s" in ours:
            phases = ", ".join(f"{k} {v:.2f}s" for k, v in ours["phases_s"].items())
            print(f"\nsekft {name} step phases: {phases}\n{ours['profile']}")
    summary = {n: {s: {k: v for k, v in r.items() if k != "profile"} for s, r in sides.items()}
               for n, sides in results.items()}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

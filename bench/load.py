"""Base loading speed and memory: sekft's loader against transformers, in one run.

    .venv/bin/python bench/load.py [--checkpoint DIR] [--make-checkpoint 135m|1b] [--warm]
                                   [--bf16-only] [--no-transformers] [--threads N]
                                   [--device cuda]

For each configuration (sekft bf16, sekft 4-bit, transformers bf16, transformers 4-bit when
it runs here), a fresh process imports, loads, reads every weight (one byte per 4 KiB page of
every parameter, so a lazily mapped model pays for its reads too) and runs one forward on 16
tokens. Reported: time from process start to the first logits, the load alone, checkpoint
GB/s over load + read, and peak RSS (and peak GPU memory with `--device cuda`, where both
sides load onto the GPU: checkpoint to GPU over the PCIe/OcuLink link); ratios are against
transformers bf16 in the same run.
Before each process the checkpoint's pages are dropped from the page cache
(posix_fadvise DONTNEED) unless --warm; the table says whether that was possible. On CUDA,
pinned host-to-device bandwidth is measured and set beside the PCIe link limits. The
4-bit rows quantize on the device they load to: on the CPU (bitsandbytes' CPU kernels: slow,
~0.3 s per 1M-weight matrix) unless `--device cuda`.

`--make-checkpoint SIZE` writes a random bf16 checkpoint into bench/checkpoints/ (gitignored):
`135m` is SmolLM2-135M-shaped, `1b` Llama-3.2-1B-shaped (2.5 GB, two shards), each with
SmolLM2's tokenizer files from the test fixtures. Results go to bench/results/load.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINTS = ROOT / "bench" / "checkpoints"
RESULTS = ROOT / "bench" / "results"
TOKENIZER = ROOT / "tests" / "fixtures" / "templates" / "smollm2"

# Shapes from the models' own config.json files on the hub.
SHAPES = {
    "135m": dict(  # HuggingFaceTB/SmolLM2-135M-Instruct
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
    "1b": dict(  # meta-llama/Llama-3.2-1B-Instruct
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
}

# Theoretical one-direction bandwidth, GB/s, after 128b/130b (3.0+) line coding.
PCIE_LIMITS = {
    "PCIe 3.0 x4": 3.94,
    "PCIe 4.0 x4 (OcuLink)": 7.88,
    "PCIe 5.0 x4": 15.75,
    "PCIe 3.0 x16": 15.75,
    "PCIe 4.0 x16": 31.5,
    "PCIe 5.0 x16": 63.0,
}


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor a llama checkpoint of `config` stores, by HF name."""
    h, m = config["hidden_size"], config["intermediate_size"]
    head_dim = h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], h), "model.norm.weight": (h,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (config["vocab_size"], h)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (m, h),
            p + "mlp.up_proj.weight": (m, h),
            p + "mlp.down_proj.weight": (h, m),
        }
    return shapes


def make_checkpoint(size: str) -> Path:
    """Write a random bf16 checkpoint of `size` into bench/checkpoints/ (atomically)."""
    import torch
    from safetensors.torch import save_file

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "torch_dtype": "bfloat16",
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        **SHAPES[size],
    }
    folder = CHECKPOINTS / f"random-{size}"
    tmp = CHECKPOINTS / f".random-{size}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shapes = tensor_shapes(config)
    shards = 2 if size == "1b" else 1
    names = list(shapes)
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for shard in range(shards):
        part = names[shard * len(names) // shards : (shard + 1) * len(names) // shards]
        file = (
            "model.safetensors"
            if shards == 1
            else f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        )
        tensors = {}
        for name in part:
            std = 1.0 if name.endswith("norm.weight") else 0.02
            tensors[name] = (torch.randn(shapes[name], generator=generator) * std).bfloat16()
            weight_map[name] = file
        save_file(tensors, tmp / file, metadata={"format": "pt"})
        del tensors
    if shards > 1:
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2)
        )
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    for file in TOKENIZER.iterdir():
        shutil.copy(file, tmp / file.name)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def checkpoint_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def drop_page_cache(folder: Path) -> bool:
    """Ask the kernel to drop the checkpoint's cached pages; False if it cannot be asked."""
    if not hasattr(os, "posix_fadvise"):
        return False
    try:
        for path in checkpoint_files(folder):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    except OSError:
        return False
    return True


# ---- the worker: one configuration in a fresh process ------------------------------------


def touch_every_page(model) -> int:
    """Read one byte of every 4 KiB page of every parameter; returns a checksum."""
    import torch

    total = 0
    for param in model.parameters():
        data = param.detach()
        if data.is_floating_point():
            data = data.contiguous().view(-1).view(torch.uint8)
        total += int(data.reshape(-1)[::4096].sum())
    return total


def worker(
    side: str, four_bit: bool, folder: Path, started: float, threads: int | None, device: str
) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)

    if side == "sekft":
        from sekft.base import load_base

        imported = time.time()
        model = load_base(folder, dtype=torch.bfloat16, device=device, load_4bit=four_bit).model
    else:
        import transformers

        imported = time.time()
        kwargs = {}
        if four_bit:
            kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            )
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.bfloat16, device_map={"": device}, **kwargs
        ).eval()
    loaded = time.time()
    touch_every_page(model)
    read = time.time()
    ids = torch.arange(16, device=device)[None] + 10
    with torch.no_grad():
        logits = model(ids)
        logits = logits if isinstance(logits, torch.Tensor) else logits.logits
        float(logits[0, -1, 0])
    done = time.time()
    return {
        "import_s": imported - started,
        "load_s": loaded - imported,
        "read_s": read - loaded,
        "forward_s": done - read,
        "first_logits_s": done - started,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_gpu_bytes": (
            torch.cuda.max_memory_allocated(device) if device.startswith("cuda") else None
        ),
    }


def run_worker(
    side: str, four_bit: bool, folder: Path, warm: bool, threads: int | None, device: str
) -> dict:
    cold = False if warm else drop_page_cache(folder)
    started = time.time()
    cmd = [sys.executable, __file__, "--worker", side, "--checkpoint", str(folder),
           "--device", device]
    if four_bit:
        cmd.append("--load-4bit")
    if threads:
        cmd += ["--threads", str(threads)]
    done = subprocess.run(
        cmd + ["--started", repr(started)], capture_output=True, text=True, cwd=ROOT
    )
    name = f"{side} {'4-bit' if four_bit else 'bf16'}"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"name": name, "error": last[:160]}
    return {"name": name, "cold_cache": cold, **json.loads(done.stdout.strip().splitlines()[-1])}


def cuda_bandwidth() -> dict | None:
    """Pinned host-to-device copy bandwidth of 1 GiB, GB/s, or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    host = torch.empty(1 << 30, dtype=torch.uint8).pin_memory()
    device = torch.empty_like(host, device="cuda")
    device.copy_(host, non_blocking=True)  # warm-up
    torch.cuda.synchronize()
    start = time.time()
    for _ in range(5):
        device.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    return {"pinned_h2d_gbps": 5 * host.numel() / (time.time() - start) / 1e9, **PCIE_LIMITS}


def table(rows: list[dict], checkpoint_bytes: int) -> str:
    baseline = next(
        (r for r in rows if r["name"] == "transformers bf16" and "error" not in r), None
    )
    head = (
        f"{'configuration':<20}{'first logits':>14}{'load':>9}{'GB/s':>8}"
        f"{'peak RSS':>11}{'vs hf bf16':>12}  cache"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['name']:<20}  failed: {r['error']}")
            continue
        gbps = checkpoint_bytes / (r["load_s"] + r["read_s"]) / 1e9
        ratio = f"{r['first_logits_s'] / baseline['first_logits_s']:.2f}x" if baseline else "-"
        lines.append(
            f"{r['name']:<20}{r['first_logits_s']:>12.2f} s{r['load_s']:>7.2f} s{gbps:>8.2f}"
            f"{r['peak_rss_bytes'] / 1e9:>9.2f} GB{ratio:>12}  "
            f"{'cold' if r['cold_cache'] else 'warm'}"
            + (f"  GPU peak {r['peak_gpu_bytes'] / 1e9:.2f} GB" if r.get("peak_gpu_bytes") else "")
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="default: bench/checkpoints/random-135m")
    parser.add_argument("--make-checkpoint", choices=sorted(SHAPES), help="write one, then run")
    parser.add_argument("--warm", action="store_true", help="keep the page cache warm")
    parser.add_argument("--threads", type=int, help="torch threads per worker (default: torch's)")
    parser.add_argument("--no-transformers", action="store_true", help="sekft rows only")
    parser.add_argument("--device", default="cpu", help="where both sides load (cpu, cuda, ...)")
    parser.add_argument(
        "--bf16-only", action="store_true", help="skip the 4-bit rows (slow on CPU)"
    )
    parser.add_argument("--worker", choices=["sekft", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--load-4bit", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--started", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        result = worker(args.worker, args.load_4bit, args.checkpoint, args.started, args.threads,
                        args.device)
        print(json.dumps(result))
        return 0

    if args.make_checkpoint:
        print(f"writing random {args.make_checkpoint} checkpoint ...", flush=True)
        args.checkpoint = make_checkpoint(args.make_checkpoint)
    folder = args.checkpoint or CHECKPOINTS / "random-135m"
    if args.checkpoint is None and not folder.is_dir():
        print("writing random 135m checkpoint (first run) ...", flush=True)
        folder = make_checkpoint("135m")
    checkpoint_bytes = sum(p.stat().st_size for p in checkpoint_files(folder))

    sides = ["sekft"]
    if not args.no_transformers:
        try:
            import transformers  # noqa: F401

            sides.append("transformers")
        except ImportError:
            print("transformers is not installed: sekft rows only")
    rows = [
        run_worker(side, four_bit, folder, args.warm, args.threads, args.device)
        for side in sides
        for four_bit in ((False,) if args.bf16_only else (False, True))
    ]
    bandwidth = cuda_bandwidth()
    result = {
        "checkpoint": str(folder),
        "checkpoint_bytes": checkpoint_bytes,
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "device": args.device,
        "load_average": os.getloadavg(),
        "rows": rows,
        "cuda": bandwidth,
    }
    print(
        f"checkpoint {folder} ({checkpoint_bytes / 1e9:.2f} GB), {args.device}, fresh process "
        "per row, "
        f"threads {args.threads or 'default'}, load average {os.getloadavg()[0]:.1f}"
    )
    print(table(rows, checkpoint_bytes))
    if any(r.get("cold_cache") is False for r in rows if "error" not in r) and not args.warm:
        print("note: could not drop the page cache (no posix_fadvise): rows ran warm")
    if bandwidth:
        print(
            f"pinned host-to-device: {bandwidth['pinned_h2d_gbps']:.1f} GB/s; link limits: "
            + ", ".join(f"{k} {v} GB/s" for k, v in PCIE_LIMITS.items())
        )
    else:
        print("no CUDA here: host-to-device bandwidth not measured")
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS / ".load.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, RESULTS / "load.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where and in what precision sekft computes: one policy for every command (`--dtype auto`).

- bfloat16 on a CUDA GPU with native bf16 (sm80, Ampere, or newer);
- bfloat16 on a CPU whose bf16 matmul is native (AMX, or AVX-512 with avx512_bf16, as
  torch's own capability checks report): 5.7x float32's rate on a Zen 5 CPU with
  avx512_bf16 (943 against 165 GFLOP/s), 4-6x with AMX;
- float32 elsewhere: an AVX2 CPU emulates bf16 (~30x slower than float32), and so do T4
  and V100 GPUs.

bfloat16 means: the frozen float weights are stored in bf16 and forwards run under
`torch.autocast` in bf16. LoRA weights, AdamW's state and the loss stay float32 whatever
the choice (the LoRA layers' products run in bf16 under autocast; their gradients reach
float32 master weights). Every command prints `describe(...)`: its choice and why.

Memory: PyTorch's oneDNN (ideep) matmuls, the path of CPU bf16, cache one primitive per
shape, up to 1,024 of them (`LRU_CACHE_CAPACITY`). Row lengths and trained-token counts
change from row to row (and prompt lengths from episode to episode), so in bf16 training
(SmolLM2-135M shape, rows of 128-512 tokens) the heap in use grew by ~10 MB per step, 255 ->
412 MB over 17 steps, while the live tensors stayed the same; float32 grew 180 -> 194 MB and
stopped. With the cache at 16 entries the heap in use stayed at 237 MB from the first step to
the last, but steps took ~30% longer (primitives rebuilt within a step). sekft caps it at 256,
a few row lengths' worth of one step's matmuls: the growth stops at a quarter of PyTorch's
default ceiling. A capacity set in the environment wins.
"""

from __future__ import annotations

import contextlib
import os

import torch

# Read by ideep when it first builds a matmul, so setting it here, before any, is in time.
os.environ.setdefault("LRU_CACHE_CAPACITY", "256")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def native_bf16(device: torch.device | str) -> str | None:
    """Why `device` multiplies bf16 natively ("AMX", "avx512_bf16", "CUDA sm86"), or None."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"CUDA sm{major}{minor}" if major >= 8 else None
    if device.type == "cpu":
        if torch.cpu._is_amx_tile_supported():
            return "AMX"
        if torch.cpu._is_avx512_bf16_supported():
            return "avx512_bf16"
    return None


def choose_dtype(device: torch.device | str, requested: str = "auto") -> tuple[torch.dtype, str]:
    """(dtype, why) for `requested` ("auto" or a name in DTYPES) on `device`: "auto" is
    bfloat16 where `native_bf16` finds native bf16 matmuls, else float32."""
    if requested != "auto":
        return DTYPES[requested], "as asked (--dtype)"
    device = torch.device(device)
    found = native_bf16(device)
    if found is not None:
        return torch.bfloat16, f"auto: {found} multiplies bf16 natively"
    if device.type == "cpu":
        return torch.float32, "auto: this CPU has no AMX or avx512_bf16, so bf16 is emulated"
    return torch.float32, f"auto: {device.type} has no native bf16"


def default_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype `--dtype auto` chooses on `device` (see `choose_dtype`)."""
    return choose_dtype(device)[0]


def describe(device: torch.device | str, dtype: torch.dtype, why: str) -> str:
    """One line for a command's output: what it computes in, on what, and why."""
    device = torch.device(device)
    name = str(dtype).removeprefix("torch.")
    how = f" (weights {name}, autocast; LoRA and optimizer float32)" if uses_autocast(dtype) else ""
    return f"precision: {name}{how} on {device}: {why}"


def uses_autocast(dtype: torch.dtype) -> bool:
    return dtype in (torch.bfloat16, torch.float16)


def autocast(device: torch.device | str, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """torch.autocast in `dtype` on `device` for a half-precision dtype; nothing for float32."""
    device = torch.device(device)
    if uses_autocast(dtype):
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()

"""The precision policy (`--dtype auto`) on each kind of machine, forced through torch's own
capability checks, and bf16-autocast training on the CPU against float32."""

from __future__ import annotations

import pytest
import torch

from sekft.base import load_base
from sekft.device import autocast, choose_dtype, describe
from sekft.lora import attach_lora, lora_parameters
from sekft.loss import trained_token_loss
from sekft.quant import is_4bit


def cpu_kind(monkeypatch, amx: bool, avx512_bf16: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "dtype", "why"),
    [
        (True, True, torch.bfloat16, "AMX"),
        (False, True, torch.bfloat16, "avx512_bf16"),
        (False, False, torch.float32, "no AMX or avx512_bf16"),
    ],
)
def test_auto_is_bf16_exactly_on_cpus_with_native_bf16(monkeypatch, amx, avx512_bf16, dtype, why):
    cpu_kind(monkeypatch, amx, avx512_bf16)
    chosen, reason = choose_dtype("cpu")
    assert chosen == dtype and why in reason


@pytest.mark.parametrize(
    ("capability", "dtype"), [((8, 6), torch.bfloat16), ((7, 0), torch.float32)]
)
def test_auto_is_bf16_exactly_on_gpus_with_native_bf16(monkeypatch, capability, dtype):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert choose_dtype("cuda")[0] == dtype


@pytest.mark.parametrize("native", [True, False])
def test_an_explicit_dtype_wins_over_the_capability(monkeypatch, native):
    cpu_kind(monkeypatch, native, native)
    assert choose_dtype("cpu", "float32") == (torch.float32, "as asked (--dtype)")
    assert choose_dtype("cpu", "bfloat16")[0] == torch.bfloat16


def test_the_choice_is_one_line_naming_dtype_device_and_reason(monkeypatch):
    cpu_kind(monkeypatch, False, True)
    line = describe("cpu", *choose_dtype("cpu"))
    assert "\n" not in line
    assert line.startswith("precision: bfloat16") and "cpu" in line and "avx512_bf16" in line


def test_autocast_only_for_half_precision():
    with autocast("cpu", torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")
    with autocast("cpu", torch.float32):
        assert not torch.is_autocast_enabled("cpu")


def test_base_command_prints_its_choice(tiny_llama, monkeypatch, capsys):
    from sekft.base import main

    cpu_kind(monkeypatch, False, True)
    assert main([str(tiny_llama), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "precision: bfloat16" in out and "avx512_bf16" in out
    assert "(torch.bfloat16)" in out


def _step(model, ids: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype):
    """(loss, LoRA grads by name) of one training step of `model` computing in `dtype`."""
    model.train()
    with autocast("cpu", dtype):
        hidden = model.hidden(ids)
    loss, n = trained_token_loss(hidden, model.output_weight(), labels)
    (loss / n).backward()
    grads = {name: p.grad.clone() for name, p in lora_parameters(model).items()}
    return (loss / n).item(), grads


def _compute_in(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """A 4-bit model's float weights cast to `dtype`, its NF4 layers computing in it."""
    for module in model.modules():
        if is_4bit(module):
            module.compute_dtype = dtype
        for name, param in module.named_parameters(recurse=False):
            if not is_4bit(module) or name != "weight":
                param.data = param.data.to(dtype)


@pytest.mark.parametrize("four_bit", [False, True], ids=["float", "4bit"])
def test_bf16_autocast_training_step_on_cpu_is_close_to_float32(tiny_llama, four_bit):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (1, 48), generator=generator)
    labels = torch.where(torch.rand(1, 48, generator=generator) < 0.5, ids, -100)
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        if four_bit:
            # The same NF4 codes both times (quantizing a bf16 copy would choose some codes
            # differently): only the compute dtype changes.
            model = load_base(tiny_llama, dtype=torch.float32, device="cpu", load_4bit=True).model
            _compute_in(model, dtype)
        else:
            model = load_base(tiny_llama, dtype=dtype, device="cpu").model
        attach_lora(model, r=4, alpha=8)
        with torch.no_grad():  # a trained adapter: B non-zero, so A's gradient is too
            for name, p in lora_parameters(model).items():
                if ".lora_B." in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
        runs[dtype] = _step(model, ids, labels, dtype)
        params = lora_parameters(model).values()
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in params)
    (loss32, grads32), (loss16, grads16) = runs[torch.float32], runs[torch.bfloat16]
    assert loss16 != loss32  # bf16 did run
    assert abs(loss16 - loss32) / loss32 < 2e-2
    for name, want in grads32.items():
        got = grads16[name]
        assert (got - want).norm() / want.norm() < 0.1, name
        assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.99


def test_bf16_training_keeps_lora_and_optimizer_state_float32(tiny_llama, tmp_path):
    from test_sft import config

    from sekft.lora import read_adapter_tensors
    from sekft.sft import train

    result = train(config(tiny_llama, tmp_path, max_steps=2, dtype="bfloat16"))
    assert all(t.dtype == torch.float32 for t in read_adapter_tensors(result.out).values())
    optimizer = torch.load(next(result.out.rglob("optimizer.pt")), weights_only=True)
    states = [s for s in optimizer["state"].values()]
    assert states and all(s["exp_avg"].dtype == torch.float32 for s in states)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_training_holds_as_many_tensors_after_2k_steps_as_after_k(tiny_llama, tmp_path, dtype):
    """Memory that grows step after step is either a leak (tensors kept alive: counted here)
    or the C heap (bench/train.py prints RSS after every step)."""
    import gc

    from test_sft import config

    from sekft.sft import train

    live: dict[int, int] = {}

    def count(line: str, **metrics) -> None:
        if metrics.get("step") in (3, 6):
            gc.collect()
            live[metrics["step"]] = sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects())

    train(config(tiny_llama, tmp_path, max_steps=6, dtype=dtype), report=count)
    assert live[3] > 0 and live[6] == live[3]


@pytest.mark.parametrize(("given", "expected"), [(None, "256"), ("5", "5")])
def test_onednn_matmul_cache_is_capped_unless_the_environment_says(given, expected):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "LRU_CACHE_CAPACITY"}
    if given is not None:
        env["LRU_CACHE_CAPACITY"] = given
    code = "import os, sekft.device; print(os.environ['LRU_CACHE_CAPACITY'])"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.stdout.strip() == expected

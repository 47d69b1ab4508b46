"""NF4 loading, and how much memory loading takes (4-bit while reading; mmap for float)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from sekft import quant
from sekft.base import BLOCK_LINEAR, load_base


@pytest.fixture(scope="module")
def float_and_4bit(tiny_qwen2):
    """Qwen2 (q/k/v biases, tied embeddings) loaded in float32 and in NF4 on CPU."""
    reference = load_base(tiny_qwen2, device="cpu").model
    return reference, load_base(tiny_qwen2, device="cpu", load_4bit=True).model


def _ids() -> torch.Tensor:
    return torch.randint(3, 320, (2, 16), generator=torch.Generator().manual_seed(0))


def test_block_linears_are_nf4_with_double_quant(float_and_4bit):
    _, model = float_and_4bit
    block_linears = [m for n, m in model.named_modules() if BLOCK_LINEAR.match(n)]
    assert len(block_linears) == 7 * model.config.num_layers
    for layer in block_linears:
        state = layer.weight.quant_state
        assert state.quant_type == "nf4" and state.nested and state.blocksize == quant.BLOCKSIZE


def test_embeddings_norms_and_lm_head_stay_floating_point(float_and_4bit):
    _, model = float_and_4bit
    assert not quant.is_4bit(model.lm_head)
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert model.model.norm.weight.dtype == torch.float32
    assert model.model.layers[0].input_layernorm.weight.dtype == torch.float32


def test_4bit_logits_equal_float_model_with_bitsandbytes_dequantized_weights(
    tiny_qwen2, float_and_4bit
):
    _, model = float_and_4bit
    rebuilt = load_base(tiny_qwen2, device="cpu").model
    for name, layer in model.named_modules():
        if BLOCK_LINEAR.match(name):
            target = rebuilt.get_submodule(name)
            target.weight = nn.Parameter(quant.dequantized_weight(layer), requires_grad=False)
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()), rebuilt(_ids()), atol=1e-5, rtol=0)


def test_4bit_logits_stay_close_to_the_unquantized_model(float_and_4bit):
    """Loose: NF4 moves each weight ~10% (relative L2), which compounds over the blocks of a
    random model; we ask for relative logit error < 0.5 and cosine > 0.9, where two
    unrelated random models are at ~1.4 and ~0."""
    reference, model = float_and_4bit
    with torch.no_grad():
        got, want = model(_ids()).flatten(), reference(_ids()).flatten()
    assert ((got - want).norm() / want.norm()).item() < 0.5
    assert torch.nn.functional.cosine_similarity(got, want, dim=0).item() > 0.9


def test_nf4_weight_error_is_about_a_tenth(float_and_4bit):
    reference, model = float_and_4bit
    layer = model.model.layers[0].mlp.up_proj
    want = reference.model.layers[0].mlp.up_proj.weight
    error = (quant.dequantized_weight(layer) - want).norm() / want.norm()
    assert 0.01 < error.item() < 0.15


def test_compute_dtype_is_configurable(tiny_llama):
    model = load_base(tiny_llama, device="cpu", load_4bit=True, compute_dtype=torch.bfloat16).model
    assert model.model.layers[0].self_attn.q_proj.compute_dtype == torch.bfloat16


# ---- memory -----------------------------------------------------------------------------

HIDDEN, MLP, LAYERS = 512, 1536, 6


def _write_checkpoint(folder: Path) -> int:
    """A llama checkpoint of ~77 MB float32 written straight with safetensors; returns bytes."""
    config = dict(
        model_type="llama",
        vocab_size=256,
        hidden_size=HIDDEN,
        intermediate_size=MLP,
        num_hidden_layers=LAYERS,
        num_attention_heads=8,
        num_key_value_heads=4,
        rms_norm_eps=1e-5,
    )
    shapes = {"model.embed_tokens.weight": (256, HIDDEN), "model.norm.weight": (HIDDEN,)}
    shapes["lm_head.weight"] = (256, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
            p + "self_attn.k_proj.weight": (HIDDEN // 2, HIDDEN),
            p + "self_attn.v_proj.weight": (HIDDEN // 2, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": (MLP, HIDDEN),
            p + "mlp.up_proj.weight": (MLP, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, MLP),
        }
    generator = torch.Generator().manual_seed(0)
    tensors = {n: torch.randn(s, generator=generator) * 0.02 for n, s in shapes.items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config))
    return sum(t.numel() * t.element_size() for t in tensors.values())


# Peak memory of the load alone, in a fresh process: after imports, writing "5" to
# /proc/self/clear_refs resets the kernel's resident-set high-water mark (VmHWM) to the
# current RSS, so VmHWM after the load minus VmRSS before it is the load's own peak (after
# one small quantization, so bitsandbytes' one-time setup, ~25 MB, is not counted). RSS
# counts anonymous memory and mapped file pages alike, so a loader that kept a whole file
# mapped while quantizing would show it here.
PEAK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import bitsandbytes, torch
    from sekft import quant
    from sekft.base import load_model
    from sekft.checkpoint import read_config
    from sekft.model import ModelConfig

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    folder = Path(sys.argv[1])
    config = ModelConfig.from_hf(read_config(folder))
    quant.quantize_linear(torch.ones(64, 64), None, "cpu", torch.float32)  # one-time setup
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    model = load_model(folder, config, device="cpu", load_4bit=sys.argv[2] == "4bit",
                       dtype=torch.float32)
    print(json.dumps({"peak": status("VmHWM") - before}))
    """
)


def _peak_load_bytes(folder: Path, mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(folder), mode],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])["peak"]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_4bit_load_peak_memory_stays_well_below_the_float_model(tmp_path):
    float_bytes = _write_checkpoint(tmp_path / "ckpt")
    peak = _peak_load_bytes(tmp_path / "ckpt", "4bit")
    # 4-bit block linears are 1/8 of float32 (9.5 MB here); quantizing one tensor takes a
    # few temporaries of its size (the largest is 3 MB): ~25 MB measured, about a third of
    # the float model. Half leaves room for allocator slack.
    assert peak < 0.5 * float_bytes, f"peak {peak / 1e6:.1f} MB vs float {float_bytes / 1e6:.1f} MB"


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path)):
            start, end = line.split()[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_cpu_weights_in_their_stored_dtype_stay_backed_by_the_file(tiny_llama):
    model = load_base(tiny_llama, device="cpu", dtype=torch.float32).model
    ranges = _mapped_ranges((tiny_llama / "model.safetensors").resolve())
    for name, param in model.named_parameters():
        address = param.data_ptr()
        assert any(a <= address < b for a, b in ranges), f"{name} was copied"


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_cpu_weights_converted_to_another_dtype_are_copies(tiny_llama):
    model = load_base(tiny_llama, device="cpu", dtype=torch.bfloat16).model
    ranges = _mapped_ranges((tiny_llama / "model.safetensors").resolve())
    address = model.model.layers[0].mlp.up_proj.weight.data_ptr()
    assert not any(a <= address < b for a, b in ranges)


# ---- one 4-bit path on every CPU kind ------------------------------------------------------
# bitsandbytes' own Linear4bit repacks its weight in place on CPUs with avx512_bf16 (it reads
# `has_avx512bf16()` when the layer is built). Forcing that flag both ways runs, on any
# machine, what each kind of CPU would run.


@pytest.fixture(params=[True, False], ids=["avx512_bf16", "no_avx512_bf16"])
def cpu_kind(request, monkeypatch) -> bool:
    import bitsandbytes.nn.modules

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: request.param)
    return request.param


def _state(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in layer.state_dict().items()}


def test_forwards_leave_the_4bit_weight_and_state_as_loaded(cpu_kind):
    weight = torch.randn(128, 192, generator=torch.Generator().manual_seed(0))
    layer = quant.quantize_linear(weight, None, "cpu", torch.float32).eval()
    before, dequantized = _state(layer), quant.dequantized_weight(layer).clone()
    x = torch.randn(3, 192)
    with torch.no_grad():  # the condition under which Linear4bit repacks
        layer(x)
    layer.train()
    layer(x.requires_grad_()).sum().backward()
    state = layer.weight.quant_state
    assert state.nested and state.absmax.dtype == torch.uint8
    assert not getattr(state, "packing_format_for_cpu", False)
    after = _state(layer)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(quant.dequantized_weight(layer), dequantized)


@pytest.mark.parametrize("in_features", [96, 100, 576])
def test_4bit_forward_takes_input_sizes_that_are_not_multiples_of_64(cpu_kind, in_features):
    weight = torch.randn(64, in_features, generator=torch.Generator().manual_seed(1))
    layer = quant.quantize_linear(weight, torch.randn(64), "cpu", torch.float32).eval()
    x = torch.randn(5, in_features)
    with torch.no_grad():
        got = layer(x)
    want = nn.functional.linear(x, quant.dequantized_weight(layer), layer.bias)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_4bit_float32_compute_is_not_rounded_to_bf16(cpu_kind):
    """bf16 keeps 8 bits of mantissa: rounding the activations or the weight to it moves
    these outputs by ~1e-2; float32 compute agrees with a float32 matmul to ~1e-6."""
    weight = torch.randn(256, 512, generator=torch.Generator().manual_seed(2))
    layer = quant.quantize_linear(weight, None, "cpu", torch.float32).eval()
    x = torch.randn(4, 512, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = layer(x)
    want = x.double() @ quant.dequantized_weight(layer).double().t()
    assert got.dtype == torch.float32
    assert (got.double() - want).abs().max().item() < 1e-4

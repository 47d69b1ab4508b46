"""sekft.lora on small module trees named like our decoder: the wrapper, attach, reset/zero,
disable, merge, PEFT-format save/load and its errors, on float and bitsandbytes 4-bit layers.

Parity with PEFT on real (tiny) checkpoints is in test_lora_peft.py.
"""

from __future__ import annotations

import json
import math
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

from sekft import lora
from sekft.errors import AdapterError
from sekft.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    DEFAULT_TARGETS,
    LoRALinear,
    attach_lora,
    count_parameters,
    detach_lora,
    load_adapter,
    lora_disabled,
    lora_parameters,
    lora_scaling,
    merge_lora,
    reset_lora,
    save_adapter,
    unmerge_lora,
    vllm_warnings,
    zero_lora,
)
from sekft.quant import dequantized_weight, quantize_linear

HIDDEN, FFN, KV = 16, 24, 8


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(HIDDEN, HIDDEN, bias=True)
        self.k_proj = nn.Linear(HIDDEN, KV, bias=True)
        self.v_proj = nn.Linear(HIDDEN, KV, bias=True)
        self.o_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, v = self.k_proj(x), self.v_proj(x)
        return self.o_proj(self.q_proj(x) * torch.cat([k * v, k + v], dim=-1))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(HIDDEN, FFN, bias=False)
        self.up_proj = nn.Linear(HIDDEN, FFN, bias=False)
        self.down_proj = nn.Linear(FFN, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = Attention()
        self.mlp = MLP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(x)
        return x + self.mlp(x)


class Inner(nn.Module):
    def __init__(self, layers: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(32, HIDDEN)
        self.layers = nn.ModuleList(Block() for _ in range(layers))
        self.norm = nn.LayerNorm(HIDDEN)


class Toy(nn.Module):
    """Parameter names as in a Hugging Face causal LM: model.layers.0.self_attn.q_proj..."""

    def __init__(self, layers: int = 2) -> None:
        super().__init__()
        self.model = Inner(layers)
        self.lm_head = nn.Linear(HIDDEN, 32, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            x = layer(x)
        return self.lm_head(self.model.norm(x))


def toy(seed: int = 0, layers: int = 2) -> Toy:
    torch.manual_seed(seed)
    return Toy(layers)


def ids() -> torch.Tensor:
    return torch.arange(10).reshape(2, 5)


def randomize_lora(model: nn.Module, seed: int = 1) -> None:
    """Non-zero B (and A) so the adapter changes outputs, as after training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)


def to_4bit(layer: nn.Linear) -> nn.Module:
    """An NF4 (double-quant) copy of `layer` as the loader makes it, float32 compute, CPU."""
    bias = layer.bias.data.clone() if layer.bias is not None else None
    return quantize_linear(layer.weight.data.clone(), bias, "cpu", torch.float32)


def toy_4bit(seed: int = 0) -> Toy:
    """The toy with every decoder-block projection in NF4, like load_base(load_4bit=True)."""
    model = toy(seed)
    for block in model.model.layers:
        for parent in (block.self_attn, block.mlp):
            for name, child in list(parent.named_children()):
                setattr(parent, name, to_4bit(child))
    return model


# The wrapper


def test_scaling_is_alpha_over_r_and_alpha_over_sqrt_r_with_rslora() -> None:
    assert lora_scaling(8, 16) == 2.0
    assert lora_scaling(16, 8, rslora=True) == 2.0


def test_forward_adds_scaled_b_a_x_to_the_base_output() -> None:
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoRALinear(base, r=3, alpha=6.0)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 6)
    a, b = layer.lora_A.weight, layer.lora_B.weight
    expected = x @ base.weight.T + base.bias + 2.0 * (x @ a.T @ b.T)
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("autocast", [False, True])
def test_forward_and_gradients_are_the_same_on_batched_input_and_under_autocast(autocast):
    # The float path accumulates the update into the base output in place; under autocast
    # (bf16 outputs, float32 LoRA weights) it adds instead. Both must give what the plain
    # formula gives, gradients included, for [B, T, in] input.
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(6, 5), r=3, alpha=6.0)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 4, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
        a, b = layer.lora_A.weight, layer.lora_B.weight
        expected = layer.base_layer(x) + (x @ a.T * 2.0) @ b.T
    assert y.shape == (2, 4, 5) and y.dtype == expected.dtype
    tol = {"atol": 2e-2, "rtol": 2e-2} if autocast else {}
    torch.testing.assert_close(y, expected, **tol)
    grads = torch.autograd.grad(y.float().square().sum(), (x, a, b))
    reference = torch.autograd.grad(expected.float().square().sum(), (x, a, b))
    for got, want in zip(grads, reference, strict=True):
        torch.testing.assert_close(got, want, **tol)


def test_rslora_scales_the_update_by_alpha_over_sqrt_r() -> None:
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoRALinear(base, r=4, alpha=6.0, rslora=True)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 6)
    update = x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    torch.testing.assert_close(layer(x) - base(x), 3.0 * update)


def test_lora_a_is_kaiming_uniform_and_b_is_zero() -> None:
    layer = LoRALinear(nn.Linear(64, 8), r=16, alpha=16)
    bound = 1 / math.sqrt(64)  # kaiming_uniform with a=sqrt(5): gain*sqrt(3/fan_in)
    assert layer.lora_A.weight.abs().max() <= bound
    assert layer.lora_A.weight.abs().max() > 0.8 * bound
    assert torch.count_nonzero(layer.lora_B.weight) == 0


def test_dropout_acts_before_a_in_training_only() -> None:
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(32, 8), r=4, alpha=4, dropout=0.5)
    nn.init.normal_(layer.lora_B.weight)
    no_dropout = LoRALinear(layer.base_layer, r=4, alpha=4)
    no_dropout.load_state_dict(layer.state_dict())
    x = torch.randn(3, 32)
    layer.eval()
    torch.testing.assert_close(layer(x), no_dropout(x))
    layer.train()
    assert not torch.allclose(layer(x), no_dropout(x))


def test_lora_weights_default_to_float32_and_cast_back_to_the_input_dtype() -> None:
    base = nn.Linear(8, 8).to(torch.bfloat16)
    layer = LoRALinear(base, r=2, alpha=2)
    assert layer.lora_A.weight.dtype == torch.float32
    assert layer(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


@settings(max_examples=25, deadline=None)
@given(
    in_features=st.integers(1, 12), out_features=st.integers(1, 12), r=st.integers(1, 6),
    alpha=st.floats(0.5, 64), rslora=st.booleans(), seed=st.integers(0, 2**16),
)
def test_forward_equals_the_merged_linear_map(in_features, out_features, r, alpha, rslora, seed):
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(in_features, out_features), r, alpha, rslora=rslora)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, in_features)
    scaling = alpha / (math.sqrt(r) if rslora else r)
    merged = layer.weight + scaling * layer.lora_B.weight @ layer.lora_A.weight
    torch.testing.assert_close(layer(x), nn.functional.linear(x, merged, layer.bias),
                               rtol=1e-4, atol=1e-4)


# Attach


def test_default_targets_wrap_every_projection_of_every_block() -> None:
    model = toy()
    wrapped = attach_lora(model, r=2, alpha=4)
    assert len(wrapped) == 2 * len(DEFAULT_TARGETS)
    assert {name.rsplit(".", 1)[-1] for name in wrapped} == set(DEFAULT_TARGETS)
    assert not isinstance(model.lm_head, LoRALinear)


def test_fresh_adapter_leaves_outputs_unchanged() -> None:
    model = toy()
    before = model(ids())
    attach_lora(model, r=4, alpha=8)
    torch.testing.assert_close(model(ids()), before, rtol=0, atol=0)


def test_only_lora_parameters_are_trainable() -> None:
    model = toy()
    attach_lora(model, r=2, alpha=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_parameters(model))
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_base_state_dict_keeps_checkpoint_names_and_tensors() -> None:
    model = toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attach_lora(model, r=2, alpha=4)
    after = model.state_dict()
    base_keys = [k for k in after if ".lora_" not in k]
    assert base_keys == list(before)
    for key in base_keys:
        assert torch.equal(after[key], before[key])


def test_base_weights_are_shared_not_copied() -> None:
    model = toy()
    weight = model.model.layers[0].self_attn.q_proj.weight
    attach_lora(model, r=2, alpha=4)
    assert model.model.layers[0].self_attn.q_proj.weight is weight


def test_count_parameters_reports_lora_as_trainable() -> None:
    model = toy()
    total_before = sum(p.numel() for p in model.parameters())
    attach_lora(model, r=2, alpha=4, targets=["q_proj"])
    lora_count = 2 * (2 * HIDDEN + 2 * HIDDEN)  # two layers of A [2, 16] and B [16, 2]
    assert count_parameters(model) == (lora_count, total_before + lora_count)


def test_unknown_target_module_is_rejected_naming_the_real_ones() -> None:
    with pytest.raises(AdapterError, match=r"unknown LoRA target.*qkv_proj.*q_proj"):
        attach_lora(toy(), r=2, alpha=4, targets=["q_proj", "qkv_proj"])


def test_target_that_is_not_linear_is_rejected() -> None:
    with pytest.raises(AdapterError, match="embed_tokens.*Embedding"):
        attach_lora(toy(), r=2, alpha=4, targets=["embed_tokens"])


def test_attaching_twice_is_rejected() -> None:
    model = toy()
    attach_lora(model, r=2, alpha=4)
    with pytest.raises(AdapterError, match="already has LoRA"):
        attach_lora(model, r=2, alpha=4)


@pytest.mark.parametrize("training", [False, True])
def test_attached_layers_take_the_models_mode_so_an_eval_model_gets_no_dropout(training) -> None:
    model = toy().train(training)
    attach_lora(model, r=2, alpha=4, dropout=0.5)
    assert {m.training for m in lora.lora_modules(model).values()} == {training}
    randomize_lora(model)
    if not training:
        with torch.no_grad():
            assert torch.equal(model(ids()), model(ids()))


@pytest.mark.parametrize("r, dropout", [(0, 0.0), (2, 1.0), (2, -0.1)])
def test_bad_rank_or_dropout_is_rejected(r: int, dropout: float) -> None:
    with pytest.raises(AdapterError):
        attach_lora(toy(), r=r, alpha=4, dropout=dropout)


def test_model_to_dtype_moves_base_and_lora_together() -> None:
    model = toy()
    attach_lora(model, r=2, alpha=4)
    randomize_lora(model)
    expected = model(ids()).double()
    model.to(torch.float64)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.base_layer.weight is q_proj.weight
    assert q_proj.weight.dtype == q_proj.lora_A.weight.dtype == torch.float64
    torch.testing.assert_close(model(ids()), expected, rtol=1e-5, atol=1e-5)


# Reset, zero, disable


def test_reset_lora_is_a_function_of_the_seed() -> None:
    first, second = toy(), toy()
    attach_lora(first, r=2, alpha=4)
    attach_lora(second, r=2, alpha=4, seed=7)
    randomize_lora(first)
    reset_lora(first, seed=7)
    for name, param in lora_parameters(first).items():
        assert torch.equal(param, lora_parameters(second)[name])
    reset_lora(first, seed=8)
    a = "model.layers.0.self_attn.q_proj.lora_A.weight"
    assert not torch.equal(lora_parameters(first)[a], lora_parameters(second)[a])


def test_reset_lora_gives_back_the_base_outputs() -> None:
    model = toy()
    before = model(ids())
    attach_lora(model, r=2, alpha=4)
    randomize_lora(model)
    reset_lora(model, seed=3)
    torch.testing.assert_close(model(ids()), before, rtol=0, atol=0)


def test_zero_lora_empties_every_adapter() -> None:
    model = toy()
    before = model(ids())
    attach_lora(model, r=2, alpha=4)
    randomize_lora(model)
    zero_lora(model)
    assert all(torch.count_nonzero(p) == 0 for p in lora_parameters(model).values())
    torch.testing.assert_close(model(ids()), before, rtol=0, atol=0)


def test_lora_disabled_computes_the_base_alone_then_restores() -> None:
    model = toy()
    base = model(ids())
    attach_lora(model, r=2, alpha=4)
    randomize_lora(model)
    adapted = model(ids())
    with lora_disabled(model):
        torch.testing.assert_close(model(ids()), base, rtol=0, atol=0)
    torch.testing.assert_close(model(ids()), adapted, rtol=0, atol=0)


def test_lora_disabled_in_one_thread_leaves_the_adapter_on_in_another() -> None:
    # The evaluator runs base-only and adapter episodes concurrently on one model.
    model = toy()
    base = model(ids())
    attach_lora(model, r=2, alpha=4)
    randomize_lora(model)
    adapted = model(ids())
    inside, release = threading.Event(), threading.Event()
    seen = {}

    def base_only() -> None:
        with lora_disabled(model):
            inside.set()
            release.wait(10)
            seen["disabled thread"] = model(ids())

    worker = threading.Thread(target=base_only)
    worker.start()
    inside.wait(10)
    seen["other thread"] = model(ids())
    release.set()
    worker.join()
    torch.testing.assert_close(seen["disabled thread"], base, rtol=0, atol=0)
    torch.testing.assert_close(seen["other thread"], adapted, rtol=0, atol=0)
    torch.testing.assert_close(model(ids()), adapted, rtol=0, atol=0)


def test_functions_on_a_model_without_lora_say_to_attach_first() -> None:
    with pytest.raises(AdapterError, match="attach_lora first"):
        reset_lora(toy(), seed=0)


# Merge


def test_merged_forward_equals_unmerged_forward() -> None:
    model = toy()
    attach_lora(model, r=4, alpha=8)
    randomize_lora(model)
    unmerged = model(ids())
    merge_lora(model)
    torch.testing.assert_close(model(ids()), unmerged, rtol=1e-5, atol=1e-5)


def test_merge_adds_the_hand_computed_delta_to_the_weight() -> None:
    model = toy()
    attach_lora(model, r=4, alpha=8)
    randomize_lora(model)
    q_proj = model.model.layers[0].self_attn.q_proj
    original = q_proj.weight.detach().clone()
    merge_lora(model)
    expected = original + 2.0 * q_proj.lora_B.weight @ q_proj.lora_A.weight
    torch.testing.assert_close(q_proj.weight.detach(), expected)


def test_unmerge_restores_the_original_weights() -> None:
    model = toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attach_lora(model, r=4, alpha=8)
    randomize_lora(model)
    merge_lora(model)
    merged_output = model(ids())
    unmerge_lora(model)
    for key, value in before.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(ids()), merged_output, rtol=1e-5, atol=1e-5)


def test_merge_refuses_4bit_layers_and_points_to_export() -> None:
    model = toy_4bit()
    attach_lora(model, r=2, alpha=4)
    with pytest.raises(AdapterError, match="4-bit.*export_merged"):
        merge_lora(model)


def test_disable_and_reset_refuse_a_merged_model() -> None:
    model = toy()
    attach_lora(model, r=2, alpha=4)
    merge_lora(model)
    with pytest.raises(AdapterError, match="unmerge first"):
        with lora_disabled(model):
            pass
    with pytest.raises(AdapterError, match="unmerge first"):
        reset_lora(model, seed=0)


# 4-bit


def test_4bit_lora_matches_float_lora_on_the_dequantized_weights() -> None:
    quantized = toy_4bit()
    attach_lora(quantized, r=2, alpha=4)
    randomize_lora(quantized)
    reference = toy()  # same seed: same embeddings, norms, biases, lm_head
    with torch.no_grad():
        for name, module in lora.lora_modules(quantized).items():
            reference.get_submodule(name).weight.copy_(dequantized_weight(module.base_layer))
    attach_lora(reference, r=2, alpha=4)
    reference.load_state_dict(lora_parameters(quantized), strict=False)
    torch.testing.assert_close(quantized(ids()), reference(ids()), rtol=1e-5, atol=1e-5)


def test_4bit_backward_reaches_lora_parameters_only() -> None:
    model = toy_4bit()
    attach_lora(model, r=2, alpha=4)
    randomize_lora(model)
    model(ids()).square().mean().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(lora_parameters(model))
    assert all(torch.count_nonzero(p.grad) > 0 for p in lora_parameters(model).values())


def test_4bit_quantized_storage_is_unchanged_by_an_optimizer_step() -> None:
    model = toy_4bit()
    attach_lora(model, r=2, alpha=4)
    before = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    lora_before = {k: v.detach().clone() for k, v in lora_parameters(model).items()}
    optimizer = torch.optim.AdamW(lora_parameters(model).values(), lr=1e-2)
    model(ids()).square().mean().backward()
    optimizer.step()
    after = model.state_dict()
    assert any(k.endswith(".weight.absmax") for k in before)  # quant_state is in there
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    changed = [k for k, v in lora_parameters(model).items() if not torch.equal(v, lora_before[k])]
    assert changed


# Save and load (PEFT format)


def trained_toy(tmp_path, **attach) -> tuple[Toy, torch.Tensor]:
    model = toy()
    attach_lora(model, **{"r": 4, "alpha": 8, **attach})
    randomize_lora(model)
    return model, model(ids())


def test_saved_adapter_has_peft_keys_and_only_lora_tensors(tmp_path) -> None:
    model, _ = trained_toy(tmp_path)
    save_adapter(model, tmp_path, "org/toy")
    tensors = load_file(tmp_path / ADAPTER_WEIGHTS)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    assert set(tensors) == {"base_model.model." + k for k in lora_parameters(model)}
    assert tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (
        HIDDEN, 4,
    )


def test_saved_config_has_peft_fields(tmp_path) -> None:
    model, _ = trained_toy(tmp_path, dropout=0.05, rslora=True, targets=["v_proj", "q_proj"])
    save_adapter(model, tmp_path, "org/toy")
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    expected = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
        "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": "org/toy", "bias": "none", "fan_in_fan_out": False,
        "use_rslora": True, "use_dora": False, "modules_to_save": None, "inference_mode": True,
    }
    assert {k: config[k] for k in expected} == expected


def test_save_then_load_reproduces_outputs_on_a_fresh_base(tmp_path) -> None:
    model, adapted = trained_toy(tmp_path, rslora=True)
    save_adapter(model, tmp_path, None)
    fresh = toy()
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh(ids()), adapted, rtol=0, atol=0)


def test_load_into_resident_slots_replaces_their_weights(tmp_path) -> None:
    model, adapted = trained_toy(tmp_path)
    save_adapter(model, tmp_path, None)
    resident = toy()
    attach_lora(resident, r=4, alpha=1)
    randomize_lora(resident, seed=9)
    load_adapter(resident, tmp_path)
    torch.testing.assert_close(resident(ids()), adapted, rtol=0, atol=0)


def test_save_overwrites_atomically_leaving_no_temp_files(tmp_path, monkeypatch) -> None:
    model, _ = trained_toy(tmp_path)
    save_adapter(model, tmp_path, None)
    first = (tmp_path / ADAPTER_WEIGHTS).read_bytes()

    def crash(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half an adapter")
        raise OSError("disk full")

    monkeypatch.setattr(lora, "save_file", crash)
    randomize_lora(model, seed=5)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, tmp_path, None)
    assert (tmp_path / ADAPTER_WEIGHTS).read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]


# vLLM check


def test_vllm_warnings_name_each_refusal() -> None:
    config = {"r": 32, "modules_to_save": ["lm_head"], "bias": "all", "use_dora": True}
    found = vllm_warnings(config)
    assert len(found) == 4
    assert "--max-lora-rank" in found[0]
    assert vllm_warnings({"r": 32}, max_lora_rank=64) == []
    assert vllm_warnings({"r": 16, "bias": "none", "modules_to_save": None}) == []


def test_save_warns_when_vllm_would_refuse_the_rank(tmp_path) -> None:
    model, _ = trained_toy(tmp_path, r=32)
    with pytest.warns(UserWarning, match="max-lora-rank"):
        found = save_adapter(model, tmp_path, None)
    assert len(found) == 1


# Bad adapters


def saved(tmp_path) -> tuple[Toy, object]:
    model, _ = trained_toy(tmp_path)
    save_adapter(model, tmp_path, "org/toy")
    return model, tmp_path


def edit_config(folder, **changes) -> None:
    path = folder / ADAPTER_CONFIG
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_missing_adapter_folder(tmp_path) -> None:
    with pytest.raises(AdapterError, match="does not exist"):
        load_adapter(toy(), tmp_path / "nope")


def test_missing_adapter_weights_file(tmp_path) -> None:
    _, folder = saved(tmp_path)
    (folder / ADAPTER_WEIGHTS).unlink()
    with pytest.raises(AdapterError, match=f"{ADAPTER_WEIGHTS}: missing"):
        load_adapter(toy(), folder)


def test_missing_adapter_config_file(tmp_path) -> None:
    _, folder = saved(tmp_path)
    (folder / ADAPTER_CONFIG).unlink()
    with pytest.raises(AdapterError, match=f"{ADAPTER_CONFIG}: missing"):
        load_adapter(toy(), folder)


def test_truncated_safetensors_is_reported_as_corrupt(tmp_path) -> None:
    _, folder = saved(tmp_path)
    path = folder / ADAPTER_WEIGHTS
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(AdapterError, match="truncated or corrupt"):
        load_adapter(toy(), folder)


def test_garbage_safetensors_is_reported_as_corrupt(tmp_path) -> None:
    _, folder = saved(tmp_path)
    (folder / ADAPTER_WEIGHTS).write_bytes(b"\x00" * 64)
    with pytest.raises(AdapterError, match="truncated or corrupt"):
        load_adapter(toy(), folder)


def test_rank_in_config_disagreeing_with_tensors(tmp_path) -> None:
    _, folder = saved(tmp_path)
    edit_config(folder, r=8)
    with pytest.raises(AdapterError, match="rank mismatch.*r=8.*rank 4"):
        load_adapter(toy(), folder)


def test_adapter_for_another_base_is_a_shape_mismatch(tmp_path) -> None:
    _, folder = saved(tmp_path)
    tensors = load_file(folder / ADAPTER_WEIGHTS)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[key] = torch.zeros(4, HIDDEN * 2)
    save_file(tensors, folder / ADAPTER_WEIGHTS)
    with pytest.raises(AdapterError, match="q_proj.lora_A.weight has shape.*another base.*org/toy"):
        load_adapter(toy(), folder)


def test_adapter_with_more_layers_than_the_model(tmp_path) -> None:
    _, folder = saved(tmp_path)
    with pytest.raises(AdapterError, match="layers.1.*matches no LoRA layer"):
        load_adapter(toy(layers=1), folder)


def test_adapter_targeting_a_module_the_model_lacks(tmp_path) -> None:
    _, folder = saved(tmp_path)
    # As in PEFT, a target naming no module is allowed; the tensors of the others then
    # match no layer the config selects (tests/test_lora_unseen.py: a fitting one loads).
    edit_config(folder, target_modules=["q_proj", "c_attn"])
    with pytest.raises(AdapterError, match="down_proj.lora_A.weight matches no LoRA layer"):
        load_adapter(toy(), folder)


def test_unsupported_dora_adapter_is_rejected(tmp_path) -> None:
    _, folder = saved(tmp_path)
    edit_config(folder, use_dora=True)
    with pytest.raises(AdapterError, match="use_dora"):
        load_adapter(toy(), folder)


def test_resident_slots_of_another_rank_are_rejected(tmp_path) -> None:
    _, folder = saved(tmp_path)
    resident = toy()
    attach_lora(resident, r=2, alpha=4)
    with pytest.raises(AdapterError, match="rank mismatch.*r=4.*r=2"):
        load_adapter(resident, folder)


def test_a_failed_load_leaves_the_model_untouched(tmp_path) -> None:
    _, folder = saved(tmp_path)
    edit_config(folder, r=8)
    model = toy()
    with pytest.raises(AdapterError):
        load_adapter(model, folder)
    assert not lora.lora_modules(model)


def test_detach_lora_gives_back_the_original_layers() -> None:
    model = toy()
    q_proj = model.model.layers[0].self_attn.q_proj
    before = model(ids())
    attach_lora(model, r=2, alpha=4)
    randomize_lora(model)
    merge_lora(model)
    detach_lora(model)
    assert model.model.layers[0].self_attn.q_proj is q_proj
    assert not lora.lora_modules(model)
    torch.testing.assert_close(model(ids()), before, rtol=0, atol=1e-5)


def test_resident_slots_can_switch_rank_by_detaching(tmp_path) -> None:
    _, folder = saved(tmp_path)  # r=4
    resident = toy()
    attach_lora(resident, r=2, alpha=4)
    detach_lora(resident)
    load_adapter(resident, folder)
    assert {m.r for m in lora.lora_modules(resident).values()} == {4}


def test_resident_slots_on_other_targets_are_rejected(tmp_path) -> None:
    _, folder = saved(tmp_path)
    resident = toy()
    attach_lora(resident, r=4, alpha=4, targets=["q_proj", "v_proj"])
    with pytest.raises(AdapterError, match="detach_lora first"):
        load_adapter(resident, folder)


def test_adapter_targets_may_be_dotted_suffixes_as_in_peft(tmp_path) -> None:
    model, adapted = trained_toy(tmp_path, targets=["q_proj"])
    save_adapter(model, tmp_path, None)
    edit_config(tmp_path, target_modules=["self_attn.q_proj"])
    fresh = toy()
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh(ids()), adapted, rtol=0, atol=0)


# Command line


def test_check_adapter_finds_a_rank_mismatch_without_a_model(tmp_path) -> None:
    _, folder = saved(tmp_path)
    edit_config(folder, r=2)
    with pytest.raises(AdapterError, match="rank mismatch.*r=2.*rank 4"):
        lora.check_adapter(folder)


def test_check_command_says_when_vllm_would_refuse(tmp_path, capsys) -> None:
    model, _ = trained_toy(tmp_path, r=32)
    with pytest.warns(UserWarning):
        save_adapter(model, tmp_path, None)
    assert lora.main(["check", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "r=32" in out and "vLLM would refuse it: rank r=32" in out
    assert lora.main(["check", str(tmp_path), "--max-lora-rank", "64"]) == 0
    assert "refuse" not in capsys.readouterr().out


def test_cli_bad_adapter_is_one_line_on_stderr_and_exit_1(tmp_path) -> None:
    import subprocess
    import sys

    (tmp_path / ADAPTER_CONFIG).write_text("{not json")
    done = subprocess.run(
        [sys.executable, "-m", "sekft.lora", "check", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert f"{ADAPTER_CONFIG}: not valid JSON" in done.stderr

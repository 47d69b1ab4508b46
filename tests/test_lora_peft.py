"""sekft.lora against the oracles, on tiny random checkpoints: PEFT on the transformers model
reads our adapters and writes adapters we read, with the same logits (float32, 1e-4);
merged exports load in our loader and in transformers; the 4-bit base trains LoRA only.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from sekft.base import load_base
from sekft.lora import (
    attach_lora,
    export_merged,
    load_adapter,
    lora_parameters,
    merge_lora,
    save_adapter,
    unmerge_lora,
)

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TOL = dict(rtol=1e-4, atol=1e-4)


def input_ids() -> torch.Tensor:
    return torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))


def hf_model(folder) -> torch.nn.Module:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.eval()


def hf_logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids()).logits


def our_logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids())


def trained_lora(model: torch.nn.Module, seed: int = 1) -> None:
    """Non-zero A and B, as after training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_sekft_adapter_loaded_by_peft_gives_the_same_logits(kind, request, tmp_path) -> None:
    folder = request.getfixturevalue(f"tiny_{kind}")
    base = load_base(folder, dtype=torch.float32, device="cpu")
    attach_lora(base.model, r=4, alpha=8, dropout=0.1)
    trained_lora(base.model)
    save_adapter(base.model, tmp_path, str(folder))
    ours = our_logits(base.model)

    theirs = hf_logits(peft.PeftModel.from_pretrained(hf_model(folder), tmp_path))
    assert not torch.allclose(ours, hf_logits(hf_model(folder)), **TOL)  # the adapter matters
    torch.testing.assert_close(ours, theirs, **TOL)


@pytest.mark.parametrize("rslora, dropout", [(False, 0.0), (True, 0.1)])
def test_peft_adapter_with_nonzero_b_loads_with_the_same_logits(
    rslora, dropout, tiny_mistral, tmp_path
) -> None:
    torch.manual_seed(0)
    config = peft.LoraConfig(
        r=4, lora_alpha=16, lora_dropout=dropout, use_rslora=rslora, task_type="CAUSAL_LM",
        target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
        init_lora_weights=False,  # random B too: the adapter changes the logits
    )
    made = peft.get_peft_model(hf_model(tiny_mistral), config)
    made.save_pretrained(tmp_path)
    theirs = hf_logits(made.eval())

    base = load_base(tiny_mistral, dtype=torch.float32, device="cpu")
    loaded = load_adapter(base.model, tmp_path)
    assert loaded["use_rslora"] is rslora
    assert not torch.allclose(theirs, hf_logits(hf_model(tiny_mistral)), **TOL)
    torch.testing.assert_close(our_logits(base.model), theirs, **TOL)


def test_merge_then_forward_equals_unmerged_forward_on_the_decoder(tiny_llama) -> None:
    base = load_base(tiny_llama, dtype=torch.float32, device="cpu")
    original = {k: v.clone() for k, v in base.model.state_dict().items()}
    attach_lora(base.model, r=4, alpha=8)
    trained_lora(base.model)
    unmerged = our_logits(base.model)
    merge_lora(base.model)
    torch.testing.assert_close(our_logits(base.model), unmerged, **TOL)
    unmerge_lora(base.model)
    for key, value in original.items():
        torch.testing.assert_close(base.model.state_dict()[key], value, rtol=0, atol=1e-6)


def test_export_merged_loads_in_our_loader_and_transformers(tiny_qwen2, tmp_path) -> None:
    base = load_base(tiny_qwen2, dtype=torch.float32, device="cpu")
    attach_lora(base.model, r=4, alpha=8)
    trained_lora(base.model)
    adapted = our_logits(base.model)
    out = export_merged(base.model, tmp_path / "merged", base.path)

    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    ours = load_base(out, dtype=torch.float32, device="cpu")
    torch.testing.assert_close(our_logits(ours.model), adapted, **TOL)
    torch.testing.assert_close(hf_logits(hf_model(out)), adapted, **TOL)


def test_export_merged_from_the_4bit_base_dequantizes(tiny_llama, tmp_path) -> None:
    base = load_base(tiny_llama, dtype=torch.float32, device="cpu", load_4bit=True)
    attach_lora(base.model, r=4, alpha=8, targets=["q_proj", "down_proj"])
    trained_lora(base.model)
    adapted = our_logits(base.model)
    out = export_merged(base.model, tmp_path / "merged", base.path)
    torch.testing.assert_close(hf_logits(hf_model(out)), adapted, **TOL)


def merge_cli(base_dir, tmp_path, *extra: str):
    """Save a trained adapter on `base_dir`, merge it with `python -m sekft.lora merge`; returns
    the adapter's logits (unmerged, float32) and the merged folder."""
    from sekft import lora
    from sekft.checkpoint import tensor_index

    base = load_base(base_dir, dtype=torch.float32, device="cpu")
    attach_lora(base.model, r=4, alpha=8)
    trained_lora(base.model)
    save_adapter(base.model, tmp_path / "adapter", None)
    out = tmp_path / "merged"
    assert lora.main(["merge", "--base", str(base_dir), "--adapter", str(tmp_path / "adapter"),
                      "--out", str(out), *extra]) == 0
    return our_logits(base.model), out, {i.dtype for i in tensor_index(out).values()}


def test_merge_command_keeps_a_float32_base_in_float32(tiny_llama, tmp_path, capsys) -> None:
    adapted, out, dtypes = merge_cli(tiny_llama, tmp_path)
    assert dtypes == {torch.float32}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    assert capsys.readouterr().out.rstrip().endswith("(float32)")
    merged = load_base(out, dtype=torch.float32, device="cpu")
    # bf16 (the old default) is ~2e-2 off here, float32 ~2e-6.
    torch.testing.assert_close(our_logits(merged.model), adapted, rtol=0, atol=1e-5)


def test_merge_command_keeps_a_bf16_base_in_bf16_and_dtype_overrides(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    base_dir = tmp_path / "bf16-base"
    shutil.copytree(tiny_llama, base_dir)
    tensors = load_file(base_dir / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()},
              base_dir / "model.safetensors", metadata={"format": "pt"})
    assert merge_cli(base_dir, tmp_path / "a")[2] == {torch.bfloat16}
    assert merge_cli(base_dir, tmp_path / "b", "--dtype", "float32")[2] == {torch.float32}


def test_stored_dtype_is_float32_when_a_checkpoint_mixes_dtypes() -> None:
    from pathlib import Path

    from sekft.checkpoint import TensorInfo, stored_dtype

    def index(*dtypes):
        return {f"t{n}": TensorInfo(f"t{n}", Path("x"), d, (1,)) for n, d in enumerate(dtypes)}

    assert stored_dtype(index(torch.bfloat16, torch.bfloat16, torch.int64)) == torch.bfloat16
    assert stored_dtype(index(torch.bfloat16, torch.float16)) == torch.float32


def test_4bit_base_backward_reaches_lora_only_and_leaves_storage_unchanged(tiny_llama) -> None:
    base = load_base(tiny_llama, dtype=torch.float32, device="cpu", load_4bit=True)
    model = base.model
    attach_lora(model, r=4, alpha=8)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    assert any(k.endswith("q_proj.weight.absmax") for k in frozen)
    model.train()
    model.grad_ckpt = True
    optimizer = torch.optim.AdamW(lora_parameters(model).values(), lr=1e-2)
    logits = model(input_ids())
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), input_ids().flatten()).backward()

    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(lora_parameters(model))
    b_grads = [p.grad for n, p in lora_parameters(model).items() if ".lora_B." in n]
    assert all(torch.count_nonzero(g) > 0 for g in b_grads)
    optimizer.step()
    state = model.state_dict()
    for key, value in frozen.items():
        assert torch.equal(state[key], value), key


def test_merge_command_writes_a_checkpoint_transformers_loads(tiny_llama, tmp_path) -> None:
    from sekft.lora import main

    base = load_base(tiny_llama, dtype=torch.float32, device="cpu")
    attach_lora(base.model, r=4, alpha=8, targets=["v_proj", "gate_proj"])
    trained_lora(base.model)
    save_adapter(base.model, tmp_path / "adapter", str(tiny_llama))
    adapted = our_logits(base.model)
    argv = ["merge", "--base", str(tiny_llama), "--adapter", str(tmp_path / "adapter"),
            "--out", str(tmp_path / "merged"), "--dtype", "float32"]
    assert main(argv) == 0
    torch.testing.assert_close(hf_logits(hf_model(tmp_path / "merged")), adapted, **TOL)


def test_merging_into_a_memory_mapped_base_leaves_the_checkpoint_file_alone(
    tiny_llama, tmp_path
) -> None:
    import hashlib
    import shutil

    folder = shutil.copytree(tiny_llama, tmp_path / "base")
    weights = folder / "model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    base = load_base(folder, dtype=torch.float32, device="cpu")  # stored dtype: stays mapped
    attach_lora(base.model, r=4, alpha=8)
    trained_lora(base.model)
    merge_lora(base.model)
    del base
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == digest


@pytest.mark.parametrize("avx512_bf16", [True, False], ids=["avx512_bf16", "no_avx512_bf16"])
def test_merge_from_the_4bit_base_is_the_same_after_any_number_of_forwards(
    tiny_llama, monkeypatch, avx512_bf16
) -> None:
    """bitsandbytes' Linear4bit repacks its weight (lossily) in its first eval-mode forward
    without grad on avx512_bf16 CPUs; the flag is forced both ways, so any machine runs both."""
    import bitsandbytes.nn.modules

    from sekft.lora import merged_state_dict
    from sekft.resident import base_checksum

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: avx512_bf16)
    model = load_base(tiny_llama, dtype=torch.float32, device="cpu", load_4bit=True).model
    attach_lora(model, r=4, alpha=8)
    trained_lora(model)
    before, checksum = merged_state_dict(model), base_checksum(model)
    for _ in range(3):
        our_logits(model)  # eval mode, no grad
        model.train()
        model(input_ids()).sum().backward()
        model.eval()
    after = merged_state_dict(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert base_checksum(model) == checksum

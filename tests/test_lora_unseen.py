"""LoRA adapters made elsewhere, and what sekft writes read elsewhere, on tiny random checkpoints.

Every adapter here is made by PEFT itself (the oracle) on the transformers model, or is one of
ours with one config field edited. For each: either sekft loads it with PEFT's logits
(float32, 1e-5), or refuses it with one line naming the file and the field. Loading it with
a field ignored (rsLoRA's or a pattern's scaling, a PiSSA-rewritten base, replicated layers)
is the failure these guard against.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sekft.base import load_base
from sekft.errors import AdapterError
from sekft.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    attach_lora,
    check_adapter,
    load_adapter,
    lora_modules,
    lora_parameters,
    save_adapter,
    vllm_warnings,
)

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TOL = dict(rtol=1e-5, atol=1e-5)
SOME = ["q_proj", "v_proj", "down_proj"]
# The regex Unsloth writes as target_modules (vision and text models alike).
UNSLOTH_REGEX = (
    r"(?:.*?(?:language|text).*?(?:self_attn|attention|attn|mlp|feed_forward|ffn|dense).*?"
    r"(?:q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj).*?)|(?:\bmodel\.layers\.[\d]{1,}"
    r"\.(?:self_attn|attention|attn|mlp|feed_forward|ffn|dense)\.(?:(?:q_proj|k_proj|v_proj|"
    r"o_proj|gate_proj|up_proj|down_proj)))"
)


def input_ids() -> torch.Tensor:
    return torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))


def hf_model(folder) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def hf_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=input_ids()).logits


def our_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids())


def peft_adapter(base_dir, out, save_kw=None, **config) -> torch.Tensor:
    """Save a PEFT adapter with random A and B made with LoraConfig(**config) into `out`;
    return the logits of PEFT's model."""
    torch.manual_seed(0)
    config = {"r": 4, "lora_alpha": 16, "task_type": "CAUSAL_LM", "init_lora_weights": False,
              **config}
    made = peft.get_peft_model(hf_model(base_dir), peft.LoraConfig(**config))
    made.save_pretrained(out, **(save_kw or {}))
    return hf_logits(made)


def loaded_logits(base_dir, adapter) -> torch.Tensor:
    base = load_base(base_dir, dtype=torch.float32, device="cpu")
    load_adapter(base.model, adapter)
    return our_logits(base.model)


def edit_config(folder, **changes) -> None:
    path = folder / ADAPTER_CONFIG
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# Loaded exactly


@pytest.mark.parametrize("config", [
    dict(target_modules=SOME + ["c_attn", "query_key_value"]),  # PEFT keeps unmatched names
    dict(target_modules=r".*\.(q_proj|v_proj)"),
    dict(target_modules=UNSLOTH_REGEX),
    dict(target_modules="all-linear"),  # PEFT saves the full names it expanded to
    dict(target_modules=SOME, exclude_modules=["model.layers.0.self_attn.q_proj"]),
    dict(target_modules=SOME, exclude_modules=r".*layers\.1\.mlp\..*"),
    dict(target_modules=SOME, layers_to_transform=[1]),
    dict(target_modules=SOME, layers_to_transform=0, layers_pattern="layers"),
    dict(target_modules=SOME, rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 4}),
    dict(target_modules=SOME, use_rslora=True, rank_pattern={r"layers\.0\.self_attn\.q_proj": 8},
         alpha_pattern={"down_proj": 3}),
    dict(target_modules=SOME, lora_dropout=0.2),
], ids=["unmatched-names", "regex", "unsloth-regex", "all-linear", "exclude-list",
        "exclude-regex", "layers-to-transform", "layers-pattern", "rank-alpha-pattern",
        "rslora-patterns", "dropout"])
def test_peft_adapter_loads_with_peft_logits(config, tiny_llama, tmp_path) -> None:
    theirs = peft_adapter(tiny_llama, tmp_path, **config)
    assert not torch.allclose(theirs, hf_logits(hf_model(tiny_llama)), **TOL)
    torch.testing.assert_close(loaded_logits(tiny_llama, tmp_path), theirs, **TOL)


def test_a_bin_adapter_loads_like_its_safetensors_twin(tiny_llama, tmp_path) -> None:
    theirs = peft_adapter(tiny_llama, tmp_path, dict(safe_serialization=False),
                          target_modules=SOME)
    assert (tmp_path / "adapter_model.bin").is_file() and not (tmp_path / ADAPTER_WEIGHTS).exists()
    torch.testing.assert_close(loaded_logits(tiny_llama, tmp_path), theirs, **TOL)
    assert check_adapter(tmp_path) == []


def test_a_corrupt_bin_adapter_is_one_line_naming_the_file(tiny_llama, tmp_path) -> None:
    peft_adapter(tiny_llama, tmp_path, dict(safe_serialization=False), target_modules=SOME)
    (tmp_path / "adapter_model.bin").write_bytes(b"\x00" * 64)
    with pytest.raises(AdapterError, match=r"adapter_model\.bin: cannot be read") as e:
        check_adapter(tmp_path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("rename", [
    lambda k: k.replace(".weight", ".default.weight"),  # a PeftModel's own state_dict names
    lambda k: k.removeprefix("base_model.model."),  # transformers' add_adapter/save_pretrained
], ids=["default-adapter-name", "no-peft-prefix"])
def test_keys_as_other_savers_write_them_load(rename, tiny_llama, tmp_path) -> None:
    theirs = peft_adapter(tiny_llama, tmp_path, target_modules=SOME)
    path = tmp_path / ADAPTER_WEIGHTS
    save_file({rename(k): v for k, v in load_file(path).items()}, path)
    torch.testing.assert_close(loaded_logits(tiny_llama, tmp_path), theirs, **TOL)


def test_a_hand_written_all_linear_config_loads(tiny_llama, tmp_path) -> None:
    theirs = peft_adapter(tiny_llama, tmp_path, target_modules="all-linear")
    edit_config(tmp_path, target_modules="all-linear")
    torch.testing.assert_close(loaded_logits(tiny_llama, tmp_path), theirs, **TOL)


def test_a_pissa_adapter_converted_by_peft_loads(tiny_llama, tmp_path) -> None:
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=SOME, init_lora_weights="pissa")
    made = peft.get_peft_model(hf_model(tiny_llama), config)
    made.peft_config["default"].init_lora_weights = True  # PEFT's recipe for the conversion
    made.save_pretrained(tmp_path / "initial")
    made.peft_config["default"].init_lora_weights = "pissa"
    with torch.no_grad():
        for name, p in made.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    theirs = hf_logits(made)
    made.save_pretrained(tmp_path / "lora",
                         path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    torch.testing.assert_close(loaded_logits(tiny_llama, tmp_path / "lora"), theirs, **TOL)


def test_fields_of_older_and_newer_peft_versions_load_when_empty(tiny_llama, tmp_path) -> None:
    theirs = peft_adapter(tiny_llama, tmp_path, target_modules=SOME)
    edit_config(tmp_path, some_future_option=None, another_future_flag=False, future_list=[],
                enable_lora=None, merge_weights=False)  # PEFT 0.2's, as in alpaca-lora
    torch.testing.assert_close(loaded_logits(tiny_llama, tmp_path), theirs, **TOL)


# Refused, one line naming the file and the field


REFUSED_BY_PEFT_CONFIG = {
    "use_dora": dict(use_dora=True),
    "bias": dict(bias="lora_only"),
    "modules_to_save": dict(modules_to_save=["lm_head"]),
    "lora_bias": dict(lora_bias=True),
    "layer_replication": dict(layer_replication=[[0, 1], [0, 1]]),  # was loaded, 3.1 off
    "trainable_token_indices": dict(trainable_token_indices=[5, 7]),
    "init_lora_weights": dict(init_lora_weights="pissa"),  # was loaded, ~1.9 off
}


@pytest.mark.parametrize("field", sorted(REFUSED_BY_PEFT_CONFIG))
def test_peft_features_sekft_lacks_are_refused_naming_the_field(field, tiny_llama, tmp_path):
    peft_adapter(tiny_llama, tmp_path, target_modules=SOME, **REFUSED_BY_PEFT_CONFIG[field])
    base = load_base(tiny_llama, dtype=torch.float32, device="cpu")
    with pytest.raises(AdapterError, match=rf"{ADAPTER_CONFIG}: field '{field}' is ") as e:
        load_adapter(base.model, tmp_path)
    assert "\n" not in str(e.value)
    assert not lora_modules(base.model)


@pytest.mark.parametrize("targets, selected", [
    (["q_proj", "lm_head"], "lm_head, the output layer"),
    (["q_proj", "embed_tokens"], r"model.embed_tokens, not a linear layer \(Embedding\)"),
])
def test_targets_outside_the_decoders_linear_layers_are_refused(targets, selected, tiny_llama,
                                                                 tmp_path) -> None:
    peft_adapter(tiny_llama, tmp_path, target_modules=targets)
    base = load_base(tiny_llama, dtype=torch.float32, device="cpu")
    with pytest.raises(AdapterError, match=f"field 'target_modules' .* selects {selected}"):
        load_adapter(base.model, tmp_path)


@pytest.mark.parametrize("changes, field", [
    (dict(alora_invocation_tokens=[5, 6]), "alora_invocation_tokens"),
    (dict(target_parameters=["mlp.experts.down_proj"]), "target_parameters"),
    (dict(some_future_option={"enabled": True}), "some_future_option"),
    (dict(init_lora_weights="olora"), "init_lora_weights"),
    (dict(target_modules=None), "target_modules"),
    (dict(target_modules="(unclosed"), "target_modules"),
    (dict(target_modules=["o_proj_that_is_not_here"]), "target_modules"),
    (dict(rank_pattern={"q_proj": "big"}), "rank_pattern"),
], ids=["alora", "target-parameters", "unknown", "olora", "none", "bad-regex", "no-layer",
        "bad-pattern"])
def test_edited_configs_are_refused_naming_the_field(changes, field, tiny_llama, tmp_path):
    peft_adapter(tiny_llama, tmp_path, target_modules=SOME)
    edit_config(tmp_path, **changes)
    with pytest.raises(AdapterError, match=rf"{ADAPTER_CONFIG}: field '{field}' is ") as e:
        loaded_logits(tiny_llama, tmp_path)
    assert "\n" not in str(e.value)


def test_an_adapter_for_another_base_is_refused(tiny_llama, tmp_path) -> None:
    from tiny import make_tiny_checkpoint

    wider = make_tiny_checkpoint(tmp_path / "wider", intermediate_size=128)
    peft_adapter(wider, tmp_path / "adapter", target_modules=SOME)
    with pytest.raises(AdapterError, match=f"{ADAPTER_WEIGHTS}: tensor .*down_proj.* another base"):
        loaded_logits(tiny_llama, tmp_path / "adapter")


def test_lm_head_is_refused_as_a_training_target(tiny_llama) -> None:
    # The loss reads lm_head's weight directly: LoRA there would silently never train.
    base = load_base(tiny_llama, dtype=torch.float32, device="cpu")
    with pytest.raises(AdapterError, match="matches lm_head, the output layer"):
        attach_lora(base.model, r=4, alpha=8, targets=["q_proj", "lm_head"])


# Resident slots


def test_resident_slots_must_be_on_the_adapters_layers_and_ranks(tiny_llama, tmp_path) -> None:
    peft_adapter(tiny_llama, tmp_path / "top", target_modules=SOME, layers_to_transform=[1])
    peft_adapter(tiny_llama, tmp_path / "pattern", target_modules=SOME, rank_pattern={"v_proj": 2})
    base = load_base(tiny_llama, dtype=torch.float32, device="cpu")
    attach_lora(base.model, r=4, alpha=8, targets=SOME)
    with pytest.raises(AdapterError, match="detach_lora first"):
        load_adapter(base.model, tmp_path / "top")
    with pytest.raises(AdapterError, match="rank mismatch: the adapter has r=2 on .*v_proj"):
        load_adapter(base.model, tmp_path / "pattern")


# What sekft writes, read elsewhere


def test_a_partial_adapter_is_saved_with_full_names_and_reads_back_everywhere(
    tiny_llama, tmp_path
) -> None:
    theirs = peft_adapter(tiny_llama, tmp_path / "peft", target_modules=SOME,
                          layers_to_transform=[1])
    base = load_base(tiny_llama, dtype=torch.float32, device="cpu")
    load_adapter(base.model, tmp_path / "peft")
    save_adapter(base.model, tmp_path / "ours", str(tiny_llama))
    targets = json.loads((tmp_path / "ours" / ADAPTER_CONFIG).read_text())["target_modules"]
    assert targets == sorted(f"model.layers.1.{m}" for m in
                             ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"])
    torch.testing.assert_close(loaded_logits(tiny_llama, tmp_path / "ours"), theirs, **TOL)
    again = peft.PeftModel.from_pretrained(hf_model(tiny_llama), tmp_path / "ours")
    torch.testing.assert_close(hf_logits(again), theirs, **TOL)


def test_our_adapter_meets_vllms_loader(tiny_llama, tmp_path) -> None:
    """vLLM's PEFTHelper needs r, lora_alpha and target_modules and refuses modules_to_save,
    DoRA and (by default) a bias; its parse_fine_tuned_lora_name takes keys
    `base_model.model.<module>.lora_A.weight` / `lora_B.weight`, and the module's last part
    must be a LoRA-able layer it knows."""
    base = load_base(tiny_llama, dtype=torch.float32, device="cpu")
    attach_lora(base.model, r=8, alpha=16)
    save_adapter(base.model, tmp_path, str(tiny_llama))
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert isinstance(config["r"], int) and config["lora_alpha"] == 16
    assert not config["modules_to_save"] and not config["use_dora"] and config["bias"] == "none"
    assert not config["rank_pattern"] and not config["alpha_pattern"]  # vLLM ignores both
    for key in load_file(tmp_path / ADAPTER_WEIGHTS):
        parts = key.split(".")
        assert key.startswith("base_model.model.") and parts[-1] == "weight"
        assert parts[-2] in ("lora_A", "lora_B") and parts[-3] in config["target_modules"]
    assert vllm_warnings(config) == []
    assert any("vLLM ignores it" in w for w in vllm_warnings({**config, "rank_pattern": {"q": 2}}))
    assert len(lora_parameters(base.model)) == 2 * 7 * 2


def test_merge_command_on_a_peft_bin_regex_pattern_adapter_gives_peft_logits(
    tiny_llama, tmp_path, capsys
) -> None:
    from sekft import lora

    theirs = peft_adapter(tiny_llama, tmp_path / "adapter", dict(safe_serialization=False),
                          target_modules=r".*\.(q_proj|down_proj)", rank_pattern={"down_proj": 2},
                          use_rslora=True)
    assert lora.main(["check", str(tmp_path / "adapter")]) == 0
    out = capsys.readouterr().out
    assert r"targets=.*\.(q_proj|down_proj): sekft loads it" in out
    assert "vLLM would refuse it: rank_pattern" in out
    assert lora.main(["merge", "--base", str(tiny_llama), "--adapter", str(tmp_path / "adapter"),
                      "--out", str(tmp_path / "merged")]) == 0
    torch.testing.assert_close(hf_logits(hf_model(tmp_path / "merged")), theirs, **TOL)


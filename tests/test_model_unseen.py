"""Real checkpoint layouts sekft had not met, against transformers (the oracle).

Each config below is a shipped config.json (source in its comment), read as shipped; the
whole-model tests scale one down (hidden 64, 3 blocks, vocab 320, windows and original
context lengths shorter than the test sequences) keeping its layout: rope type and fields,
head_dim override, tying, biases, sliding-window keys, q/k norms, eos lists.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import save_file
from tiny import make_tiny_checkpoint
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from sekft.base import load_base
from sekft.errors import CheckpointError, ConfigError
from sekft.generate import ModelPolicy, Sampling, checkpoint_stop_ids
from sekft.model import KVCache, ModelConfig, rope_attention_factor, rope_frequencies
from sekft.template import ChatTemplate

TOL = 1e-4

# Qwen/Qwen2.5-7B-Instruct; the rope_scaling is the long-context setting its model card asks
# users to add (Qwen2.5 READMEs: factor 4 over 32768).
QWEN25_7B_YARN = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 3584,
    "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 32768,
    "max_window_layers": 28, "model_type": "qwen2", "num_attention_heads": 28,
    "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.43.1", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 152064,
    "rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"},
}
# Qwen/Qwen3-0.6B (head_dim 128 != 1024 / 16, q/k norms, tied) with its card's yarn setting.
QWEN3_06B_YARN = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 3072,
    "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
    "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000, "sliding_window": None,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.51.0",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
    "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                     "original_max_position_embeddings": 32768},
}
# mistralai/Mistral-Nemo-Base-2407: head_dim 128 where hidden / heads is 160.
NEMO = {
    "architectures": ["MistralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
    "eos_token_id": 2, "head_dim": 128, "hidden_act": "silu", "hidden_size": 5120,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 128000,
    "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 40,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.3", "use_cache": True, "vocab_size": 131072,
}
# Qwen/Qwen2.5-0.5B-Instruct with use_sliding_window switched on, as users do: the window
# applies from layer max_window_layers (21) on.
QWEN25_05B_SLIDING = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
    "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 21,
    "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1", "use_cache": True, "use_sliding_window": True,
    "vocab_size": 151936,
}
# meta-llama/Llama-3.2-1B-Instruct: llama3 rope, tied, eos list.
LLAMA32_1B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "head_dim": 64,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16,
    "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0.dev0", "use_cache": True, "vocab_size": 128256,
}


def scaled_down(config: dict) -> dict:
    """`config` at test size, its layout kept: 4 heads (2 kv heads under GQA) of 16, or 32
    where the original head_dim differs from hidden / heads; 3 blocks; window 8; original
    context 16; the layer from which Qwen slides scaled to 1 of 3."""
    c = dict(config)
    heads = config["num_attention_heads"]
    grouped = config.get("num_key_value_heads", heads) != heads
    c.update(hidden_size=64, num_attention_heads=4, num_key_value_heads=2 if grouped else 4,
             intermediate_size=96, num_hidden_layers=3, vocab_size=320, initializer_range=0.1)
    if config.get("head_dim") is not None:
        c["head_dim"] = 16 if config["head_dim"] * heads == config["hidden_size"] else 32
    if config.get("sliding_window") is not None:
        c["sliding_window"] = 8
    if "max_window_layers" in config:
        sliding = config["max_window_layers"] < config["num_hidden_layers"]
        c["max_window_layers"] = 1 if sliding else 3
    scaling = config.get("rope_scaling")
    if scaling and "original_max_position_embeddings" in scaling:
        c["rope_scaling"] = {**scaling, "original_max_position_embeddings": 16}
        c["max_position_embeddings"] = 64
    for key in ("bos_token_id", "eos_token_id"):
        ids = config.get(key)
        c[key] = [i % 320 for i in ids] if isinstance(ids, list) else ids % 320
    return c


@pytest.fixture(scope="module")
def tokenizer_files(tiny_llama):
    return [tiny_llama / "tokenizer.json", tiny_llama / "tokenizer_config.json"]


def write_checkpoint(folder, config: dict, tokenizer_files, head: str = "absent"):
    """A checkpoint folder: `config` written as given, random weights from transformers' model
    for it (norm weights and biases drawn too: transformers sets them to 1 and 0, which would
    hide one not applied). A tied model stores no lm_head, or (`head`) a copy of the
    embeddings ("copy") or a different matrix ("different")."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.from_pretrained(folder), dtype=torch.float32
    )
    generator = torch.Generator().manual_seed(1)
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("norm.weight") or name.endswith(".bias"):
            base = 1.0 if name.endswith("norm.weight") else 0.0
            tensor = base + 0.3 * torch.randn(tensor.shape, generator=generator)
        state[name] = tensor.contiguous()
    if config.get("tie_word_embeddings"):
        embed = state["model.embed_tokens.weight"]
        state["lm_head.weight"] = {
            "copy": embed.clone(), "different": torch.randn(embed.shape, generator=generator)
        }.get(head)
        if state["lm_head.weight"] is None:
            del state["lm_head.weight"]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    for path in tokenizer_files:
        shutil.copy(path, folder)
    return folder


def hf_logits(folder, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(ids).logits


IDS = torch.randint(3, 320, (2, 40), generator=torch.Generator().manual_seed(0))


# ---- config fields read as transformers reads them -------------------------------------


def _windows(hf) -> tuple:
    """Each layer's sliding window as transformers' config sets it up."""
    if hf.model_type == "mistral":
        return (hf.sliding_window,) * hf.num_hidden_layers
    return tuple(hf.sliding_window if t == "sliding_attention" else None
                 for t in hf.layer_types)


@pytest.mark.parametrize("config", [
    # Mistral without a sliding_window key: transformers' default window (4096), not none.
    {k: v for k, v in NEMO.items() if k != "sliding_window"},
    NEMO,
    # Qwen3 without head_dim: transformers' Qwen3 takes 128, not hidden / heads.
    {k: v for k, v in QWEN3_06B_YARN.items() if k not in ("head_dim", "rope_scaling")},
    # Sliding on without max_window_layers: transformers' default 28 (of 40 layers here).
    {**{k: v for k, v in QWEN25_05B_SLIDING.items() if k != "max_window_layers"},
     "num_hidden_layers": 40},
    QWEN25_05B_SLIDING,
], ids=["mistral-no-window-key", "nemo", "qwen3-no-head-dim", "qwen2-no-max-window-layers",
        "qwen2.5-sliding"])
def test_head_dim_and_windows_are_transformers_defaults(config):
    hf = transformers.AutoConfig.for_model(**config)
    ours = ModelConfig.from_hf(config)
    assert ours.head_dim == getattr(hf, "head_dim", hf.hidden_size // hf.num_attention_heads)
    assert ours.sliding_windows == _windows(hf)


YARN_VARIANTS = {
    "qwen2.5-card": {"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"},
    "no-original-length": {"rope_type": "yarn", "factor": 2.0},
    "mscale": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096,
               "mscale": 0.707, "mscale_all_dim": 1.0, "beta_fast": 16, "beta_slow": 2},
    "attention-factor-no-truncate": {"rope_type": "yarn", "factor": 32.0,
                                     "original_max_position_embeddings": 4096,
                                     "attention_factor": 1.25, "truncate": False},
}


@pytest.mark.parametrize("scaling", YARN_VARIANTS.values(), ids=YARN_VARIANTS.keys())
def test_yarn_frequencies_and_cos_sin_scale_match_transformers(scaling):
    config = dict(model_type="qwen2", hidden_size=256, num_attention_heads=2, vocab_size=10,
                  intermediate_size=8, num_hidden_layers=1, rms_norm_eps=1e-6,
                  max_position_embeddings=32768, rope_theta=1e6, rope_scaling=dict(scaling))
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](
        transformers.AutoConfig.for_model(**config)
    )
    ours = ModelConfig.from_hf(config)
    got = rope_frequencies(128, ours.rope_theta, ours.rope_scaling)
    torch.testing.assert_close(got, inv_freq, rtol=1e-6, atol=0)
    assert rope_attention_factor(ours.rope_scaling) == pytest.approx(attention_factor)


# ---- whole models -----------------------------------------------------------------------


@pytest.mark.parametrize("config", [
    QWEN25_7B_YARN, QWEN3_06B_YARN, NEMO, QWEN25_05B_SLIDING, LLAMA32_1B,
], ids=["qwen2.5-7b-yarn", "qwen3-0.6b-yarn", "mistral-nemo", "qwen2.5-sliding",
        "llama3.2-1b"])
def test_scaled_down_real_configs_match_transformers(tmp_path, tokenizer_files, config):
    """40 tokens: past the window (8) and the original context (16)."""
    folder = write_checkpoint(tmp_path / "ckpt", scaled_down(config), tokenizer_files)
    expected = hf_logits(folder, IDS)
    model = load_base(folder, device="cpu", dtype=torch.float32).model
    cache = KVCache(model.config.num_layers)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), expected, atol=TOL, rtol=0)
        steps = [model(IDS[:, :25], cache=cache)] + [
            model(IDS[:, t : t + 1], cache=cache) for t in range(25, 40)
        ]
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, atol=TOL, rtol=0)


def test_a_tied_checkpoint_may_store_a_copy_of_the_embeddings(tmp_path, tokenizer_files):
    config = scaled_down(QWEN25_05B_SLIDING)
    folder = write_checkpoint(tmp_path / "ckpt", config, tokenizer_files, head="copy")
    model = load_base(folder, device="cpu", dtype=torch.float32).model
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), hf_logits(folder, IDS), atol=TOL, rtol=0)


def test_a_tied_checkpoint_storing_another_head_is_refused_then_loads_untied(
    tmp_path, tokenizer_files
):
    """transformers 5 keeps such a head, transformers 4 and vLLM tie it away: sekft refuses
    until config.json says which, then matches transformers."""
    config = scaled_down(QWEN25_05B_SLIDING)
    folder = write_checkpoint(tmp_path / "ckpt", config, tokenizer_files, head="different")
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'lm_head.weight' "
                       r"differs from 'model.embed_tokens.weight', but config.json has "
                       r"tie_word_embeddings true"):
        load_base(folder, device="cpu")
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    model = load_base(folder, device="cpu", dtype=torch.float32).model
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), hf_logits(folder, IDS), atol=TOL, rtol=0)


# ---- refused, in one line naming the file and the field --------------------------------

REFUSED = {
    # microsoft/Phi-3-mini-4k-instruct: fused qkv_proj / gate_up_proj.
    "phi3": ({"model_type": "phi3", "hidden_act": "silu", "sliding_window": 2047},
             "model_type 'phi3' is not supported"),
    "gemma": ({"model_type": "gemma", "hidden_act": "gelu", "head_dim": 256},
              "model_type 'gemma' is not supported"),
    "gemma2": ({"model_type": "gemma2", "hidden_act": "gelu_pytorch_tanh"},
               "model_type 'gemma2' is not supported"),
    "olmo2": ({"model_type": "olmo2"}, "model_type 'olmo2' is not supported"),
    "granite": ({"model_type": "granite", "embedding_multiplier": 12.0},
                "model_type 'granite' is not supported"),
    # Dynamic NTK recomputes frequencies from the longest sequence seen: stateful.
    "dynamic": ({"rope_scaling": {"type": "dynamic", "factor": 2.0}},
                "rope type 'dynamic' is not supported"),
    # deepseek-ai/DeepSeek-R1-0528-Qwen3-8B: vLLM applies attn_factor, transformers not.
    "attn-factor": ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                      "original_max_position_embeddings": 32768,
                                      "attn_factor": 0.8782488562869419}},
                    "rope scaling 'attn_factor' is not supported"),
    # unsloth/*-bnb-4bit, *-AWQ, *-GPTQ-Int4, *-FP8: packed weights, not floats.
    "bnb-4bit": ({"quantization_config": {"quant_method": "bitsandbytes",
                                          "load_in_4bit": True}},
                 "quantization_config \\(quant_method 'bitsandbytes'\\) is not supported"),
}


@pytest.mark.parametrize(("fields", "message"), REFUSED.values(), ids=REFUSED.keys())
def test_configs_outside_the_family_are_refused_naming_file_and_field(fields, message):
    with pytest.raises(ConfigError, match="^m/config.json: " + message) as error:
        ModelConfig.from_hf({**LLAMA32_1B, **fields}, source="m/config.json")
    assert "\n" not in str(error.value)


# ---- stop tokens ------------------------------------------------------------------------


def test_stop_ids_come_from_generation_config_else_config(tmp_path):
    assert checkpoint_stop_ids(tmp_path, LLAMA32_1B) == {128001, 128008, 128009}
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [151645, 151643]})
    )
    assert checkpoint_stop_ids(tmp_path, QWEN25_7B_YARN) == {151645, 151643}
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": True}))
    assert checkpoint_stop_ids(tmp_path, QWEN25_7B_YARN) == {151645}
    assert checkpoint_stop_ids(tmp_path, {}) == frozenset()


def test_generation_stops_at_the_generation_config_eos_as_transformers(tmp_path):
    """Qwen2.5's generation_config.json stops on <|im_end|> and <|endoftext|>; the template
    and tokenizer name only <|im_end|>. A model whose every logit is 0 picks id 0,
    <|endoftext|>: transformers stops there, and so must we, the token kept out of the
    reply's content."""
    folder = make_tiny_checkpoint(tmp_path / "ckpt", "qwen2", tie_embeddings=True)
    state = transformers.AutoModelForCausalLM.from_pretrained(folder).state_dict()
    state["model.norm.weight"] = torch.zeros_like(state["model.norm.weight"])
    del state["lm_head.weight"]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder)
    prompt = [1, 20, 30, 2]
    expected = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                           pad_token_id=0)[0, len(prompt):].tolist()
    assert expected == [0]

    base = load_base(folder, device="cpu")
    policy = ModelPolicy(base.model, base.tokenizer, ChatTemplate.from_folder(folder),
                         Sampling(max_new_tokens=8), 256,
                         stop_ids=checkpoint_stop_ids(folder, base.hf_config))
    reply = policy([{"role": "user", "content": "ls"}])
    assert reply.tokens == 1
    assert "<|endoftext|>" not in reply.content

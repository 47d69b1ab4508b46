"""The decoder against transformers (the oracle): math pieces, then whole models in float32."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import make_tiny_checkpoint
from transformers.models.llama import modeling_llama

from sekft.base import load_base
from sekft.checkpoint import read_config
from sekft.errors import ConfigError
from sekft.model import (
    KVCache,
    ModelConfig,
    apply_rope,
    attention_mask,
    positions_from_doc_ids,
    rms_norm,
    rope_cos_sin,
    rope_frequencies,
    sdpa_broadcasts_heads,
    swiglu,
)

TOL = 1e-4

# ---- math pieces ------------------------------------------------------------------------


def test_rms_norm_matches_llama_rmsnorm():
    x = torch.randn(2, 5, 16)
    oracle = modeling_llama.LlamaRMSNorm(16, eps=1e-6)
    with torch.no_grad():
        oracle.weight.copy_(torch.randn(16))
        torch.testing.assert_close(rms_norm(x, oracle.weight, 1e-6), oracle(x))


def rms_norm_formula(x, weight, eps):
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_grad", [False, True])
def test_rms_norm_values_and_gradients_match_autograd_of_the_formula(dtype, weight_grad):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=dtype, requires_grad=True)
    weight = (torch.rand(16, dtype=dtype) + 0.5).requires_grad_(weight_grad)
    grad = torch.randn(3, 5, 16, dtype=dtype)
    inputs = (x, weight) if weight_grad else (x,)
    out, expected = rms_norm(x, weight, 1e-6), rms_norm_formula(x, weight, 1e-6)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(expected, inputs, grad)
    for g, w in zip(got, want, strict=True):
        # The same float32 math in another order: bf16 results round alike.
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_rms_norm_keeps_x_in_its_own_dtype_and_one_value_per_row_for_backward():
    x = torch.randn(4, 8, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.ones(8, dtype=torch.bfloat16)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        rms_norm(x, weight, 1e-6)
    big = [t for t in saved if t.numel() == x.numel()]
    assert [t.data_ptr() for t in big] == [x.data_ptr()]  # no float32 copy of x
    assert sum(t.numel() for t in saved) == x.numel() + weight.numel() + 4


def test_swiglu_values_and_gradients_match_autograd_of_the_formula():
    torch.manual_seed(0)
    gate = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    up = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, 7, dtype=torch.float64)
    expected = torch.nn.functional.silu(gate) * up
    torch.testing.assert_close(swiglu(gate, up), expected)
    got = torch.autograd.grad(swiglu(gate, up), (gate, up), grad)
    want = torch.autograd.grad(expected, (gate, up), grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    assert torch.autograd.gradcheck(swiglu, (gate, up))


def test_swiglu_keeps_only_gate_and_up_for_backward():
    gate = torch.randn(4, 8, requires_grad=True)
    up = torch.randn(4, 8, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        swiglu(gate, up)
    assert len(saved) == 2
    assert {t.data_ptr() for t in saved} == {gate.data_ptr(), up.data_ptr()}


def test_sdpa_broadcasts_kv_heads_on_cpu_and_on_cuda_only_where_flash_runs(monkeypatch):
    # On CUDA only the flash kernel takes enable_gqa; anything else would fall back to the
    # math kernel and keep every score matrix. No GPU here: the CUDA side is a stand-in.
    assert sdpa_broadcasts_heads(torch.zeros(1), masked=True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))

    def cuda(dtype):
        return SimpleNamespace(device=torch.device("cuda"), dtype=dtype)

    assert sdpa_broadcasts_heads(cuda(torch.bfloat16), masked=False)
    assert not sdpa_broadcasts_heads(cuda(torch.bfloat16), masked=True)
    assert not sdpa_broadcasts_heads(cuda(torch.float32), masked=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert not sdpa_broadcasts_heads(cuda(torch.float16), masked=False)


def test_rms_norm_of_a_constant_row_is_the_weight():
    weight = torch.arange(4.0)
    out = rms_norm(torch.full((1, 4), 3.0), weight, eps=0.0)
    torch.testing.assert_close(out, weight[None])


@pytest.mark.parametrize(
    "rope_parameters",
    [
        {"rope_type": "default", "rope_theta": 10000.0},
        {"rope_type": "linear", "rope_theta": 500000.0, "factor": 4.0},
        {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ],
    ids=lambda p: p["rope_type"],
)
def test_rope_frequencies_match_transformers(rope_parameters):
    config = transformers.LlamaConfig(
        hidden_size=256, num_attention_heads=2, rope_parameters=dict(rope_parameters)
    )
    oracle = modeling_llama.LlamaRotaryEmbedding(config).inv_freq
    ours = ModelConfig.from_hf({**config.to_dict(), "model_type": "llama"})
    inv_freq = rope_frequencies(128, ours.rope_theta, ours.rope_scaling)
    torch.testing.assert_close(inv_freq, oracle, rtol=1e-6, atol=0)


def test_apply_rope_matches_transformers():
    q, k = torch.randn(2, 4, 7, 16), torch.randn(2, 2, 7, 16)
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2], [5, 6, 7, 8, 9, 10, 11]])
    cos, sin = rope_cos_sin(rope_frequencies(16, 10000.0), position_ids)
    q_ref, k_ref = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(apply_rope(q, cos, sin), q_ref)
    torch.testing.assert_close(apply_rope(k, cos, sin), k_ref)


def test_apply_rope_at_position_zero_is_identity():
    x = torch.randn(1, 2, 1, 8)
    cos, sin = rope_cos_sin(rope_frequencies(8, 10000.0), torch.zeros(1, 1, dtype=torch.long))
    torch.testing.assert_close(apply_rope(x, cos, sin), x)


def test_attention_mask_is_causal():
    mask = attention_mask(torch.arange(3), torch.arange(3))
    expected = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask[0, 0], expected)


def test_attention_mask_window_counts_the_query_itself():
    # window 2: each query sees itself and one token before, as transformers' Mistral.
    mask = attention_mask(torch.arange(4), torch.arange(4), window=2)
    expected = torch.tensor(
        [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]], dtype=torch.bool
    )
    assert torch.equal(mask[0, 0], expected)


def test_attention_mask_keeps_documents_apart():
    doc = torch.tensor([[0, 0, 1, 1]])
    mask = attention_mask(torch.arange(4), torch.arange(4), doc, doc)
    expected = torch.tensor(
        [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool
    )
    assert torch.equal(mask[0, 0], expected)


def test_attention_mask_for_new_tokens_after_a_cache_sees_the_past():
    mask = attention_mask(torch.arange(3, 5), torch.arange(5))
    expected = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask[0, 0], expected)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=6))
def test_positions_restart_at_each_document(lengths):
    doc_ids = torch.tensor([[d for d, n in enumerate(lengths) for _ in range(n)]])
    expected = [p for n in lengths for p in range(n)]
    assert positions_from_doc_ids(doc_ids)[0].tolist() == expected


# ---- config -----------------------------------------------------------------------------


def test_config_reads_transformers_4_and_5_rope_layouts_alike():
    common = dict(
        model_type="llama",
        vocab_size=10,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        rms_norm_eps=1e-5,
    )
    scaling = {"factor": 2.0}
    v4 = ModelConfig.from_hf(
        {**common, "rope_theta": 1e6, "rope_scaling": {"type": "linear", **scaling}}
    )
    v5 = ModelConfig.from_hf(
        {**common, "rope_parameters": {"rope_type": "linear", "rope_theta": 1e6, **scaling}}
    )
    assert v4 == v5
    assert v4.rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_config_rejects_unknown_model_type_listing_supported(tiny_llama):
    config = {**read_config(tiny_llama), "model_type": "gpt2"}
    with pytest.raises(ConfigError, match="model_type 'gpt2' is not supported; supported: llama"):
        ModelConfig.from_hf(config, source="x/config.json")


def test_config_rejects_unknown_rope_type_listing_supported(tiny_llama):
    config = {**read_config(tiny_llama), "rope_parameters": {"rope_type": "dynamic", "factor": 2}}
    with pytest.raises(ConfigError,
                       match="rope type 'dynamic' is not supported; supported: default"):
        ModelConfig.from_hf(config)


def test_config_names_the_missing_key(tiny_llama):
    config = read_config(tiny_llama)
    del config["hidden_size"]
    with pytest.raises(ConfigError, match=r"x/config.json: missing required key 'hidden_size'"):
        ModelConfig.from_hf(config, source="x/config.json")


# ---- whole models against transformers --------------------------------------------------


def _hf_logits(folder, input_ids):
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(input_ids).logits


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 320, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=["tiny_llama", "tiny_mistral", "tiny_qwen2", "tiny_llama_sharded"])
def tiny(request):
    """Each tiny checkpoint, loaded by us, with transformers' logits for a 2 x 20 batch."""
    folder = request.getfixturevalue(request.param)
    ids = _ids(2, 20)
    return load_base(folder, device="cpu").model, ids, _hf_logits(folder, ids)


def test_logits_match_transformers_for_a_whole_sequence(tiny):
    model, ids, expected = tiny
    with torch.no_grad():
        torch.testing.assert_close(model(ids), expected, atol=TOL, rtol=0)


def test_logits_match_transformers_token_by_token_with_the_cache(tiny):
    model, ids, expected = tiny
    cache = KVCache(model.config.num_layers)
    with torch.no_grad():
        steps = [model(ids[:, t : t + 1], cache=cache) for t in range(ids.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, atol=TOL, rtol=0)
    assert cache.length == ids.shape[1]


def test_prefill_then_chunks_with_the_cache_match_transformers(tiny):
    model, ids, expected = tiny
    cache = KVCache(model.config.num_layers)
    with torch.no_grad():
        chunks = [model(ids[:, a:b], cache=cache) for a, b in [(0, 11), (11, 14), (14, 20)]]
    torch.testing.assert_close(torch.cat(chunks, dim=1), expected, atol=TOL, rtol=0)


def test_batched_decoding_of_caches_of_different_lengths_matches_transformers(tiny):
    model, ids, expected = tiny
    # Row 0 is 11 tokens in (past mistral's window of 8), row 1 only 5: each row's step
    # must see its own cache, at its own position.
    starts = [11, 5]
    caches = [KVCache(model.config.num_layers) for _ in starts]
    got: list[list[torch.Tensor]] = [[], []]
    with torch.no_grad():
        for row, (start, cache) in enumerate(zip(starts, caches, strict=True)):
            model(ids[row : row + 1, :start], cache=cache)
        for t in range(8):
            step = torch.tensor([[ids[row, start + t]] for row, start in enumerate(starts)])
            logits = model.lm_head(model.decode_hidden(step, caches))
            for row in range(2):
                got[row].append(logits[row, 0])
    for row, start in enumerate(starts):
        want = expected[row, start : start + 8]
        torch.testing.assert_close(torch.stack(got[row]), want, atol=TOL, rtol=0)
        assert caches[row].length == start + 8


def test_the_cache_holds_every_appended_key_across_its_regrowths():
    cache = KVCache(1)
    parts = [torch.randn(1, 2, n, 4) for n in (3, 60, 1, 1, 70, 1)]
    for part in parts:
        keys, values = cache.update(0, part, part + 1)
    torch.testing.assert_close(keys, torch.cat(parts, dim=2), rtol=0, atol=0)
    torch.testing.assert_close(values, torch.cat(parts, dim=2) + 1, rtol=0, atol=0)
    assert cache.length == sum(p.shape[2] for p in parts)


def test_decode_hidden_refuses_a_token_count_that_is_not_one_per_cache(tiny_llama):
    model = load_base(tiny_llama, device="cpu").model
    caches = [KVCache(model.config.num_layers)]
    with pytest.raises(ValueError, match="one token per cache"):
        model.decode_hidden(torch.tensor([[1, 2]]), caches)


def test_packed_documents_give_the_logits_each_gives_alone(tiny):
    model, ids, _ = tiny
    first, second = ids[0, :9], ids[1, :11]  # 11 > mistral's window of 8
    doc_ids = torch.tensor([[0] * 9 + [1] * 11])
    with torch.no_grad():
        packed = model(torch.cat([first, second])[None], doc_ids=doc_ids)[0]
        alone = [model(first[None])[0], model(second[None])[0]]
    torch.testing.assert_close(packed[:9], alone[0], atol=TOL, rtol=0)
    torch.testing.assert_close(packed[9:], alone[1], atol=TOL, rtol=0)


@pytest.fixture(scope="module")
def mistral_model(tiny_mistral):
    return load_base(tiny_mistral, device="cpu").model


@settings(max_examples=10, deadline=None)
@given(st.lists(st.integers(1, 12), min_size=1, max_size=4))
def test_any_packing_gives_each_document_its_own_logits(mistral_model, lengths):
    ids = _ids(1, sum(lengths), seed=len(lengths))[0]
    doc_ids = torch.tensor([[d for d, n in enumerate(lengths) for _ in range(n)]])
    with torch.no_grad():
        packed = mistral_model(ids[None], doc_ids=doc_ids)[0]
        start = 0
        for n in lengths:
            alone = mistral_model(ids[None, start : start + n])[0]
            torch.testing.assert_close(packed[start : start + n], alone, atol=TOL, rtol=0)
            start += n


def test_left_padded_batch_with_doc_ids_and_positions_matches_unpadded(tiny_llama):
    model = load_base(tiny_llama, device="cpu").model
    ids = _ids(1, 6)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    position_ids = torch.tensor([[0, 0, 0, 0, 1, 2, 3, 4, 5]])
    cache = KVCache(model.config.num_layers)
    with torch.no_grad():
        expected = model(ids)
        prefill = model(padded[:, :-1], position_ids[:, :-1], doc_ids[:, :-1], cache)
        last = model(padded[:, -1:], position_ids[:, -1:], doc_ids[:, -1:], cache)
    got = torch.cat([prefill[:, 3:], last], dim=1)
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)


def test_llama3_rope_scaling_matches_transformers(tmp_path):
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    folder = make_tiny_checkpoint(
        tmp_path, "llama", rope_parameters={"rope_theta": 500000.0, **scaling}
    )
    ids = _ids(1, 40)
    model = load_base(folder, device="cpu").model
    assert model.config.rope_scaling["rope_type"] == "llama3"
    with torch.no_grad():
        torch.testing.assert_close(model(ids), _hf_logits(folder, ids), atol=TOL, rtol=0)


def test_qwen3_matches_transformers(tmp_path):
    folder = make_tiny_checkpoint(tmp_path, "qwen3", head_dim=32)
    ids = _ids(2, 12)
    model = load_base(folder, device="cpu").model
    with torch.no_grad():
        torch.testing.assert_close(model(ids), _hf_logits(folder, ids), atol=TOL, rtol=0)


def with_random_biases(folder):
    """The checkpoint in `folder` with every bias drawn at random: transformers initialises
    biases to zero, which would hide a bias that is not applied."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(path)
    generator = torch.Generator().manual_seed(1)
    for name, tensor in tensors.items():
        if name.endswith(".bias"):
            tensors[name] = torch.randn(tensor.shape, generator=generator) * 0.5
    save_file(tensors, path, metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize(("kind", "biased"), [
    ("llama", {"q_proj", "k_proj", "v_proj", "o_proj"}),
    ("qwen3", {"q_proj", "k_proj", "v_proj", "o_proj"}),
    ("qwen2", {"q_proj", "k_proj", "v_proj"}),
    ("mistral", set()),
])
def test_attention_bias_is_read_per_architecture_as_transformers_does(tmp_path, kind, biased):
    """`attention_bias: true` biases all four projections of Llama and Qwen3; Qwen2 has q/k/v
    biases whatever it says, Mistral none."""
    folder = with_random_biases(make_tiny_checkpoint(tmp_path, kind, attention_bias=True))
    ids = _ids(2, 12)
    model = load_base(folder, device="cpu").model
    attention = model.model.layers[0].self_attn
    assert {n for n, m in attention.named_children() if getattr(m, "bias", None) is not None} \
        == biased
    with torch.no_grad():
        torch.testing.assert_close(model(ids), _hf_logits(folder, ids), atol=TOL, rtol=0)


def test_a_bias_the_config_does_not_declare_is_blamed_on_the_config(tmp_path):
    import json

    from sekft.errors import CheckpointError

    folder = make_tiny_checkpoint(tmp_path, "llama", attention_bias=True)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "attention_bias": False}))
    with pytest.raises(CheckpointError, match=r"_proj.bias' .*; config.json and the weights "
                       "disagree, or the weights are of a llama variant") as error:
        load_base(folder, device="cpu")
    assert "another architecture" not in str(error.value)


# ---- training-side contract -------------------------------------------------------------


def test_hidden_times_output_weight_is_the_logits(tiny_qwen2):
    model = load_base(tiny_qwen2, device="cpu").model
    ids = _ids(1, 5)
    with torch.no_grad():
        torch.testing.assert_close(model.hidden(ids) @ model.output_weight().T, model(ids))


def test_tied_output_weight_is_the_embedding_matrix(tiny_qwen2):
    model = load_base(tiny_qwen2, device="cpu").model
    assert model.output_weight() is model.model.embed_tokens.weight


def test_parameter_names_equal_the_checkpoint_names(tiny_llama):
    from safetensors import safe_open

    model = load_base(tiny_llama, device="cpu").model
    with safe_open(tiny_llama / "model.safetensors", "pt") as f:
        assert set(dict(model.named_parameters())) == set(f.keys())


def test_grad_ckpt_gives_the_same_gradients(tiny_llama):
    model = load_base(tiny_llama, device="cpu").model.train()
    ids = _ids(2, 10)
    weight = model.model.layers[0].mlp.up_proj.weight
    weight.requires_grad_(True)
    grads = []
    for flag in (False, True):
        model.grad_ckpt = flag
        weight.grad = None
        model(ids).square().mean().backward()
        grads.append(weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_per_document_attention_gradients_equal_the_masked_path(tiny_llama):
    """A one-row packed batch attends document by document (split q/k/v); two rows take the
    document mask instead. Both must send the same gradient back."""
    model = load_base(tiny_llama, device="cpu", dtype=torch.float32).model
    embed = model.model.embed_tokens.weight.requires_grad_()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (1, 24), generator=generator)
    docs = torch.tensor([[0] * 7 + [1] * 10 + [2] * 7])
    weights = torch.randn(1, 24, model.config.hidden_size, generator=generator)
    (model.hidden(ids, doc_ids=docs) * weights).sum().backward()
    split = embed.grad.clone()
    embed.grad = None
    (model.hidden(ids.repeat(2, 1), doc_ids=docs.repeat(2, 1))[:1] * weights).sum().backward()
    torch.testing.assert_close(split, embed.grad, atol=1e-4, rtol=1e-3)

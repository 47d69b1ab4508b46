"""Write a GGUF file from a tiny checkpoint folder the way llama.cpp's converter does.

`write_gguf(folder, path)` follows convert_hf_to_gguf.py: tensor names `blk.N.attn_q.weight`,
llama's Q and K rows permuted for GGML's rope (`llama_cpp_permute`), metadata under the
architecture's prefix, the tokenizer as token strings, merges and token types (control for
special added tokens), the chat template under `tokenizer.chat_template`. Tensors are
quantized by the gguf package to the types in `quant` (a tensor whose rows do not fit the
type's blocks stays F32, as llama.cpp does).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# The parts of our names that llama.cpp renames (the inverse of sekft.gguf's table).
HF_TO_GGUF = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}

# A mix, so every path through the reader is taken: norms F32, embeddings Q8_0, attention
# Q4_1 (Q and K permuted before quantizing, as llama.cpp does), the MLP F16 and Q4_0.
DEFAULT_QUANT = {
    "token_embd": "Q8_0",
    "output": "F16",
    "attn_q": "Q4_1",
    "attn_k": "Q4_1",
    "attn_v": "Q8_0",
    "attn_output": "Q4_0",
    "ffn_gate": "F16",
    "ffn_up": "Q8_0",
    "ffn_down": "BF16",
}


def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute` (convert_hf_to_gguf.py): rotary pairs made adjacent."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def gguf_name(name: str) -> str:
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = name.split(".", 3)
    module, leaf = rest.rsplit(".", 1)
    return f"blk.{layer}.{HF_TO_GGUF[module]}.{leaf}"


def add_tokenizer(writer, tokenizer_json: dict, tokenizer_config: dict, pre: str) -> None:
    """Tokens, merges, types and special ids of a byte-level BPE tokenizer.json."""
    import gguf

    vocab = dict(tokenizer_json["model"]["vocab"])
    added = {t["content"]: t for t in tokenizer_json["added_tokens"]}
    for text, spec in added.items():
        vocab[text] = spec["id"]
    tokens = [text for text, _ in sorted(vocab.items(), key=lambda item: item[1])]
    types = [
        (gguf.TokenType.CONTROL if added[t]["special"] else gguf.TokenType.USER_DEFINED)
        if t in added else gguf.TokenType.NORMAL
        for t in tokens
    ]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer_json["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    ids = {text: i for i, text in enumerate(tokens)}
    setters = {"bos_token": writer.add_bos_token_id, "eos_token": writer.add_eos_token_id,
               "unk_token": writer.add_unk_token_id, "pad_token": writer.add_pad_token_id}
    for key, add in setters.items():
        if tokenizer_config.get(key) in ids:
            add(ids[tokenizer_config[key]])
    writer.add_add_bos_token(False)
    if tokenizer_config.get("chat_template"):
        writer.add_chat_template(tokenizer_config["chat_template"])


def add_block_hyperparameters(writer, config: dict, rope_theta: float) -> None:
    """The hyperparameters every llama-family GGUF states, from a Hugging Face config."""
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(rope_theta)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])


def write_gguf(folder: Path, path: Path, quant: dict[str, str] | None = None,
               pre: str = "gpt-2") -> Path:
    """A GGUF at `path` holding the tiny checkpoint in `folder` (llama or qwen2)."""
    import gguf
    from safetensors.numpy import load_file

    quant = DEFAULT_QUANT if quant is None else quant
    config = json.loads((folder / "config.json").read_text())
    arch = config["model_type"]
    writer = gguf.GGUFWriter(str(path), arch)
    add_block_hyperparameters(
        writer, config, config.get("rope_theta") or config["rope_parameters"]["rope_theta"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(config["hidden_size"] // config["num_attention_heads"])
    add_tokenizer(
        writer,
        json.loads((folder / "tokenizer.json").read_text()),
        json.loads((folder / "tokenizer_config.json").read_text()),
        pre,
    )
    for name, value in load_file(str(folder / "model.safetensors")).items():
        target = gguf_name(name)
        value = value.astype(np.float32)
        if arch == "llama" and ".attn_q." in target:
            value = llama_cpp_permute(value, config["num_attention_heads"])
        elif arch == "llama" and ".attn_k." in target:
            value = llama_cpp_permute(value, config["num_key_value_heads"])
        kind = quant.get(target.split(".")[-2] if target.startswith("blk.") else
                         target.split(".")[0], "F32")
        qtype = gguf.GGMLQuantizationType[kind]
        block, _ = gguf.GGML_QUANT_SIZES[qtype]
        if value.ndim < 2 or value.shape[-1] % block:
            qtype = gguf.GGMLQuantizationType.F32
        writer.add_tensor(target, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path

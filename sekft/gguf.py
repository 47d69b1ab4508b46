"""Import a GGUF file (llama.cpp's format) as an ordinary checkpoint folder.

    python -m sekft.gguf convert SmolLM2-135M-Instruct.Q4_1.gguf build/smollm2-135m-instruct/

writes config.json, model.safetensors (float32: every tensor dequantized by the `gguf`
package, llama.cpp's own reader, optional extra `sekft[gguf]`), tokenizer.json and
tokenizer_config.json (the GGUF's chat template and special tokens), which `load_base` and
every sekft command read like any Hugging Face folder.

Architectures: llama (Llama, Mistral, TinyLlama, SmolLM2), qwen2 (Qwen2.5,
DeepSeek-R1-Distill-Qwen) and qwen3. A model split in parts (`NAME-00001-of-00003.gguf`) is
converted from its first part, the others read from beside it.

What llama.cpp's converter (convert_hf_to_gguf.py) changed and this module undoes:
- tensor names (`blk.3.attn_q.weight` for `model.layers.3.self_attn.q_proj.weight`);
- the rows of a llama Q and K projection, reordered so that each head's rotary pairs are
  adjacent (GGML's "normal" rope) instead of half a head apart (Hugging Face's rotate_half);
  qwen2 and qwen3 use the NEOX rope, whose pairs are already half a head apart, and are not
  reordered;
- Llama 3's rope scaling, stored as a tensor of per-frequency divisors (`rope_freqs.weight`)
  instead of its parameters, which are read back from it (`llama3_scaling`);
- the tokenizer, flattened into token strings, merges (or SentencePiece scores) and token
  types, rebuilt here with `tokenizers`: a byte-level BPE whose pre-tokenizer comes from
  `tokenizer.ggml.pre`, or a SentencePiece BPE with byte fallback (`tokenizer.ggml.model`
  "llama") as Hugging Face's own tokenizer.json has it.

The folder is written under a temporary name next to OUT and renamed into place, so a
failure (a truncated file, an unsupported tensor type) leaves no half-written folder.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.processors import TemplateProcessing

from sekft.errors import CheckpointError, ConfigError, run_cli
from sekft.model import rope_frequencies
from sekft.rundir import replace_dir, write_json_atomic
from sekft.tokenizer import QWEN2_SPLIT_REGEX

# general.architecture -> the Hugging Face class whose checkpoint it holds.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)

# llama.cpp's token types (gguf.TokenType): control tokens (and SentencePiece's unknown
# token) are special added tokens, user-defined ones are added tokens matched whole but not
# special. The others (byte tokens `<0x0A>`, unused padding) are plain vocabulary.
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 2, 3, 4

# Llama 3's pre-tokenizer split (its tokenizer.json): Qwen2's, but digits in runs of three.
LLAMA3_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"""
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# llama.cpp's names for Llama 3's pre-tokenizer. Its tokenizer.json sets `ignore_merges`
# (and llama.cpp does too): a word that is a token is that token, whatever the merges make.
LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3")

# The divisors of the rotary frequencies llama.cpp's converter writes for Llama 3's scaling.
ROPE_FREQS = "rope_freqs.weight"

# The parts of a split model: `NAME-00001-of-00003.gguf` (llama.cpp's gguf-split and
# converter name them so).
SPLIT_NAME = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")

# GGUF block tensor -> Hugging Face module, inside `model.layers.N.`.
BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
TOP_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def unpermute_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's `permute` of a Q or K projection weight [n_head * head_dim, in]
    (or bias [n_head * head_dim]).

    llama.cpp stores row (h, 2*j + s) of head h what Hugging Face has at row (h, s*d/2 + j),
    d = head_dim, s in {0, 1}: rotary pairs adjacent. Returns the Hugging Face order.
    """
    rows = weight.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows do not split into {n_head} heads of rotary pairs")
    pairs = weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:])
    return pairs.transpose(1, 2).reshape(weight.shape)


def _gguf_module():
    try:
        import gguf
    except ImportError:
        raise ConfigError(
            "the gguf package is not installed; install the extra: pip install 'sekft[gguf]'"
        ) from None
    return gguf


def open_gguf(path: Path):
    """A `gguf.GGUFReader` on `path`, or a CheckpointError naming the file."""
    gguf = _gguf_module()
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError, TypeError) as e:
        raise CheckpointError(
            f"{path}: not a readable GGUF file ({e}); it is not GGUF, or truncated: "
            "download it again"
        ) from None


def read_metadata(reader, path: Path) -> dict[str, Any]:
    """Every key-value field of the file, as Python values (strings, numbers, lists)."""
    meta = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        try:
            meta[name] = field.contents()
        except (ValueError, IndexError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: metadata field {name!r} is unreadable ({e})") from None
    return meta


def gguf_parts(reader, meta: dict, path: Path) -> list:
    """The readers of every part of the model whose first (or only) part `reader` reads.

    A split model's first part holds the metadata and some tensors; parts 2..N, named alike
    beside it, hold the rest, and only the `split.*` keys. Naming a later part, or a part
    that is missing or foreign, is a CheckpointError naming the file.
    """
    count = int(meta.get("split.count", 1))
    if count <= 1:
        return [reader]
    number = int(meta.get("split.no", 0)) + 1
    match = SPLIT_NAME.match(path.name)
    if number != 1:
        first = f"{match['stem']}-00001-of-{count:05d}.gguf" if match else "the first part"
        raise CheckpointError(
            f"{path}: part {number} of {count} of a split model; convert its first part, {first}"
        )
    if match is None:
        raise CheckpointError(
            f"{path}: the first of {count} parts of a split model, but not named "
            f"NAME-00001-of-{count:05d}.gguf, so its other parts cannot be found; rename the parts"
        )
    readers = [reader]
    for number in range(2, count + 1):
        part = path.with_name(f"{match['stem']}-{number:05d}-of-{count:05d}.gguf")
        part_reader = open_gguf(part)
        part_meta = read_metadata(part_reader, part)
        if (part_meta.get("split.no"), part_meta.get("split.count")) != (number - 1, count):
            raise CheckpointError(f"{part}: not part {number} of {count} of {path.name}")
        readers.append(part_reader)
    expected = meta.get("split.tensors.count")
    found = sum(len(r.tensors) for r in readers)
    if expected is not None and found != expected:
        raise CheckpointError(
            f"{path}: the {count} parts hold {found} tensors, not the {expected} the first "
            "part lists; a part is truncated or from another model"
        )
    return readers


def _require(meta: dict, key: str, path: Path) -> Any:
    if key not in meta:
        raise CheckpointError(f"{path}: metadata field {key!r} is missing")
    return meta[key]


def hf_config(
    meta: dict,
    path: Path,
    tied: bool,
    embedding_rows: int | None = None,
    rope_factors: torch.Tensor | None = None,
) -> dict:
    """config.json for the model the metadata describes (llama, qwen2 or qwen3).

    `tied`: the file has no `output.weight`, so the lm_head is the embedding matrix.
    `embedding_rows`: rows of `token_embd.weight`, the vocabulary size when the file pads
    its embeddings beyond its token list (else `{arch}.vocab_size`, else the token count).
    `rope_factors`: the file's `rope_freqs.weight`, Llama 3's rope scaling (`llama3_scaling`).
    """
    arch = _require(meta, "general.architecture", path)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"{path}: architecture {arch!r} is not supported (general.architecture); "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    def key(suffix: str, default: Any = None) -> Any:
        if default is not None:
            return meta.get(f"{arch}.{suffix}", default)
        return _require(meta, f"{arch}.{suffix}", path)

    hidden = int(key("embedding_length"))
    heads = int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", hidden // heads))
    rope_dims = int(key("rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise CheckpointError(
            f"{path}: {arch}.rope.dimension_count {rope_dims} is not the head size {head_dim}; "
            "partial rotary embeddings are not supported"
        )
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise CheckpointError(
            f"{path}: {arch}.rope.scaling.type {scaling!r} is not supported; supported: linear"
        )
    if rope_factors is not None and scaling != "none":
        raise CheckpointError(
            f"{path}: {arch}.rope.scaling.type {scaling!r} and a {ROPE_FREQS} tensor both scale "
            "the rotary frequencies; expected one of them"
        )
    theta = float(key("rope.freq_base", 10000.0))
    tokens = _require(meta, "tokenizer.ggml.tokens", path)
    config = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": embedding_rows or int(key("vocab_size", len(tokens))),
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": theta,
        "max_position_embeddings": int(key("context_length")),
        "hidden_act": "silu",
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
    }
    if scaling == "linear":
        config["rope_scaling"] = {
            "rope_type": "linear",
            "factor": float(key("rope.scaling.factor")),
        }
    if rope_factors is not None:
        llama3 = llama3_scaling(rope_factors, head_dim, theta, path)
        if llama3 is not None:
            config["rope_scaling"] = llama3
    for name in ("bos", "eos", "padding"):
        value = meta.get(f"tokenizer.ggml.{name}_token_id")
        if value is not None:
            config[f"{'pad' if name == 'padding' else name}_token_id"] = int(value)
    return config


def llama3_scaling(
    factors: torch.Tensor, head_dim: int, theta: float, path: Path
) -> dict | None:
    """The llama3 `rope_scaling` whose frequency divisors are `factors` [head_dim // 2].

    llama.cpp's converter stores Llama 3's scaling as these divisors, not as its parameters:
    1 for fast frequencies, `factor` for slow ones, 1 / ((1 - s) / factor + s) in between,
    where s = original_len / (wavelength * (high - low)) - low / (high - low). Only that line
    s(1 / wavelength) can be read back, not the three parameters, and every (low, high,
    original_len) on it gives the same frequencies: low is taken as 1 (Llama 3's) and the
    line fitted through the in-between divisors (with fewer than two of those, the
    converter's defaults: high 4, original_len 8192). Returns None when every divisor is 1;
    raises CheckpointError naming the file when no llama3 scaling gives the divisors.
    """
    factors = factors.double().flatten()
    if factors.numel() != head_dim // 2:
        raise CheckpointError(
            f"{path}: {ROPE_FREQS} has {factors.numel()} values, not one per rotary frequency "
            f"({head_dim // 2})"
        )
    factor = float(factors.max())
    if factor <= 1 + 1e-6:
        return None
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    per_wavelength = theta**-exponents / (2 * math.pi)
    between = (factors > 1 + 1e-4) & (factors < factor * (1 - 1e-4))
    low, high, old = 1.0, 4.0, 8192
    if int(between.sum()) >= 2:
        s = (1 / factors[between] - 1 / factor) / (1 - 1 / factor)
        x = per_wavelength[between]
        slope, intercept = torch.linalg.lstsq(
            torch.stack([x, torch.ones_like(x)], dim=1), s.unsqueeze(1)
        ).solution.flatten().tolist()
        if slope > 0 and intercept < 0:
            # With low = 1: intercept = -1 / (high - 1), slope = original_len / (high - 1).
            old = round(-slope / intercept)
            high = 1 + old / slope
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
               "high_freq_factor": high, "original_max_position_embeddings": old}
    rebuilt = rope_frequencies(head_dim, theta) / rope_frequencies(head_dim, theta, scaling)
    if not torch.allclose(rebuilt.double(), factors, rtol=1e-3, atol=0):
        raise CheckpointError(
            f"{path}: {ROPE_FREQS} holds frequency divisors no llama3 rope scaling gives; "
            "sekft supports Llama 3's scaling only"
        )
    return scaling


def hf_tensor_name(name: str) -> str | None:
    """The Hugging Face name of GGUF tensor `name`, None when it has no place in the model."""
    if name in TOP_TENSORS:
        return TOP_TENSORS[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in BLOCK_TENSORS:
        return f"model.layers.{parts[1]}.{BLOCK_TENSORS[parts[2]]}.{parts[3]}"
    return None


def dequantized(tensor, path: Path) -> torch.Tensor:
    """A GGUF tensor as float32 in Hugging Face's shape (GGUF lists dimensions reversed)."""
    gguf = _gguf_module()
    kind = tensor.tensor_type.name
    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise CheckpointError(
            f"{path}: tensor {tensor.name!r} has type {kind}, which the gguf reader cannot "
            "dequantize; convert the model with another quantization"
        ) from None
    except ValueError as e:
        raise CheckpointError(f"{path}: tensor {tensor.name!r} ({kind}) is unreadable ({e})") \
            from None
    shape = tuple(int(d) for d in reversed(tensor.shape))
    if values.size != torch.Size(shape).numel():
        raise CheckpointError(
            f"{path}: tensor {tensor.name!r} holds {values.size} values, not {list(shape)}; "
            "the file is truncated or corrupt"
        )
    return torch.from_numpy(values.astype("float32").reshape(shape))


def read_tensors(gguf_tensors: list, config: dict, path: Path) -> dict[str, torch.Tensor]:
    """Every model tensor of the file (of all its parts), dequantized, renamed and (llama
    Q/K) un-permuted. `rope_freqs.weight` is left out: it is in the config (`hf_config`)."""
    tensors = {}
    for tensor in gguf_tensors:
        if tensor.name == ROPE_FREQS:
            continue
        name = hf_tensor_name(tensor.name)
        if name is None:
            raise CheckpointError(
                f"{path}: tensor {tensor.name!r} has no place in a {config['model_type']} "
                "model; the file holds an architecture sekft does not support"
            )
        value = dequantized(tensor, path)
        if config["model_type"] == "llama" and ".self_attn.q_proj." in name:
            value = unpermute_rows(value, config["num_attention_heads"])
        elif config["model_type"] == "llama" and ".self_attn.k_proj." in name:
            value = unpermute_rows(value, config["num_key_value_heads"])
        tensors[name] = value.contiguous()
    return tensors


def _pre_tokenizer(pre: str, path: Path) -> tuple[Any, Any]:
    """(normalizer, pre_tokenizer) for llama.cpp's `tokenizer.ggml.pre` name."""
    if pre in ("default", "gpt-2", "gpt2"):
        return None, pre_tokenizers.ByteLevel(add_prefix_space=False)
    if pre == "smollm":
        # SmolLM's own tokenizer.json: digits one by one, then GPT-2's split.
        return None, pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True),
             pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    # DeepSeek-R1-Distill-Qwen keeps Qwen2.5's tokenizer; llama.cpp names it apart because
    # its tokenizer adds a BOS, which changes the hash the converter tells tokenizers by.
    if pre in ("qwen2", "deepseek-r1-qwen"):
        return normalizers.NFC(), _split_then_bytes(QWEN2_SPLIT_REGEX)
    if pre in LLAMA3_PRE:
        return None, _split_then_bytes(LLAMA3_SPLIT_REGEX)
    raise CheckpointError(
        f"{path}: tokenizer.ggml.pre {pre!r} is not supported; supported: gpt-2, smollm, "
        "qwen2, deepseek-r1-qwen, llama-bpe"
    )


def _split_then_bytes(regex: str) -> Any:
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )


def adds_bos(meta: dict) -> bool:
    """Whether encoding starts with BOS: `tokenizer.ggml.add_bos_token`, else llama.cpp's
    default for the vocabulary (yes for SentencePiece's and Llama 3's, no for the others)."""
    default = (meta.get("tokenizer.ggml.model") == "llama"
               or meta.get("tokenizer.ggml.pre") in LLAMA3_PRE)
    return bool(meta.get("tokenizer.ggml.add_bos_token", default))


def build_tokenizer(meta: dict, path: Path) -> Tokenizer:
    """The tokenizer the metadata describes: `tokenizer.ggml.model` "gpt2" (byte-level BPE)
    or "llama" (SentencePiece's BPE).

    Token ids are positions in `tokenizer.ggml.tokens`; control tokens (and SentencePiece's
    unknown token) become special added tokens, user-defined ones plain added tokens;
    `adds_bos` adds a BOS post-processor.
    """
    model = _require(meta, "tokenizer.ggml.model", path)
    tokens = _require(meta, "tokenizer.ggml.tokens", path)
    types = meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    if model == "gpt2":
        tokenizer = _byte_level_bpe(meta, tokens, path)
    elif model == "llama":
        tokenizer = _sentencepiece_bpe(meta, tokens, types, path)
    else:
        raise CheckpointError(
            f"{path}: tokenizer.ggml.model {model!r} is not supported; supported: gpt2 "
            "(byte-level BPE), llama (SentencePiece BPE)"
        )
    tokenizer.add_special_tokens([
        AddedToken(tokens[i], normalized=False, special=True)
        for i, kind in enumerate(types) if kind in (TOKEN_CONTROL, TOKEN_UNKNOWN)
    ])
    tokenizer.add_tokens([
        AddedToken(tokens[i], normalized=False, special=False)
        for i, kind in enumerate(types) if kind == TOKEN_USER_DEFINED
    ])
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if adds_bos(meta) and bos is not None:
        text = tokens[bos]
        tokenizer.post_processor = TemplateProcessing(
            single=f"{text} $A", pair=f"{text} $A {text} $B", special_tokens=[(text, bos)]
        )
    return tokenizer


def _byte_level_bpe(meta: dict, tokens: list[str], path: Path) -> Tokenizer:
    """GPT-2's byte-level BPE over `tokenizer.ggml.merges`, split by `tokenizer.ggml.pre`."""
    merges = [tuple(m.split(" ", 1)) for m in _require(meta, "tokenizer.ggml.merges", path)]
    pre_name = meta.get("tokenizer.ggml.pre", "default")
    normalizer, pre = _pre_tokenizer(pre_name, path)
    vocab = {token: i for i, token in enumerate(tokens)}
    try:
        tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False,
                                  ignore_merges=pre_name in LLAMA3_PRE))
    except BaseException as e:  # a bad merge panics in Rust: pyo3's PanicException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise CheckpointError(
            f"{path}: tokenizer.ggml.tokens and tokenizer.ggml.merges disagree ({e})"
        ) from None
    if normalizer is not None:
        tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_bpe(meta: dict, tokens: list[str], types: list[int], path: Path) -> Tokenizer:
    """SentencePiece's BPE (Llama 2, Mistral 7B, TinyLlama) as their tokenizer.json has it.

    Spaces are "▁", and a "▁" goes before the text and after each special token, as llama.cpp
    does with `add_space_prefix` (on unless the file says otherwise) and those tokenizer.json
    files do; characters without a piece become their UTF-8 byte tokens (`<0xE2>`); merges
    come from the scores (`sentencepiece_merges`).
    """
    scores = _require(meta, "tokenizer.ggml.scores", path)
    if not len(scores) == len(types) == len(tokens):
        raise CheckpointError(
            f"{path}: {len(tokens)} tokens but {len(scores)} scores and {len(types)} token "
            "types; the tokenizer metadata is corrupt"
        )
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    unk_token = tokens[unk] if unk is not None and 0 <= unk < len(tokens) else None
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = sentencepiece_merges(tokens, scores, types)
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk_token, fuse_unk=True,
                              byte_fallback=True))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    spaces = normalizers.Replace(" ", "\u2581")
    tokenizer.normalizer = (
        normalizers.Sequence([normalizers.Prepend("\u2581"), spaces]) if prefix else spaces
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(
        steps + ([decoders.Strip(" ", 1, 0)] if prefix else [])
    )
    return tokenizer


def sentencepiece_merges(
    tokens: list[str], scores: list[float], types: list[int]
) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece vocabulary implies, first applied first.

    SentencePiece joins the adjacent pair whose joined piece scores highest. As merges: every
    split of a normal piece into two pieces of the vocabulary, ranked by the piece's score;
    ties as Hugging Face's converter breaks them (longer left part first, then token order).
    """
    ids = {token: i for i, token in enumerate(tokens)}
    ranked = []
    for i, (piece, score, kind) in enumerate(zip(tokens, scores, types, strict=True)):
        if kind != TOKEN_NORMAL:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                ranked.append((-score, -len(left), -len(right), i, ids[left], ids[right]))
    ranked.sort()
    return [(tokens[left], tokens[right]) for *_, left, right in ranked]


def tokenizer_config(meta: dict) -> dict:
    """tokenizer_config.json: the named special tokens, the added tokens, the chat template."""
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or []
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": adds_bos(meta),
        "added_tokens_decoder": {
            str(i): {"content": tokens[i], "lstrip": False, "normalized": False,
                     "rstrip": False, "single_word": False,
                     "special": kind != TOKEN_USER_DEFINED}
            for i, kind in enumerate(types)
            if kind in (TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED)
        },
    }
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and 0 <= token_id < len(tokens):
            config[f"{name}_token"] = tokens[token_id]
    template = meta.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return config


def convert(source: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write the checkpoint folder for GGUF file `source` at `out`; returns `out`.

    `out` must not exist unless `overwrite`. Nothing appears at `out` unless every file was
    written: the folder is built under a temporary name beside it and renamed.
    """
    source, out = Path(source), Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out}: already exists; remove it or pass --overwrite")
    reader = open_gguf(source)
    meta = read_metadata(reader, source)
    gguf_tensors = [t for part in gguf_parts(reader, meta, source) for t in part.tensors]
    names = {t.name: t for t in gguf_tensors}
    embedding = names.get("token_embd.weight")
    # GGUF lists dimensions innermost first: token_embd is [hidden, vocab].
    rows = int(embedding.shape[-1]) if embedding is not None else None
    factors = dequantized(names[ROPE_FREQS], source) if ROPE_FREQS in names else None
    config = hf_config(meta, source, "output.weight" not in names, rows, factors)
    tokenizer = build_tokenizer(meta, source)
    tensors = read_tensors(gguf_tensors, config, source)

    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        _readable_by_all(temp, 0o777)
        save_file(tensors, str(temp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save(str(temp / "tokenizer.json"))
        write_json_atomic(temp / "tokenizer_config.json", tokenizer_config(meta))
        write_json_atomic(temp / "config.json", config)
        for file in temp.iterdir():
            _readable_by_all(file, 0o666)
        replace_dir(temp, out)
    finally:
        if temp.exists():
            shutil.rmtree(temp)
    return out


def _readable_by_all(path: Path, mode: int) -> None:
    # mkdtemp and the atomic writes create owner-only files; a checkpoint is shared data.
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(mode & ~umask)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sekft.gguf", description="Import GGUF files as checkpoint folders."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    convert_parser = commands.add_parser(
        "convert", help="write a checkpoint folder (config, float safetensors, tokenizer)"
    )
    convert_parser.add_argument(
        "gguf", help="the .gguf file (llama, qwen2 or qwen3; of a split model, the first part)"
    )
    convert_parser.add_argument("out", help="the checkpoint folder to create")
    convert_parser.add_argument("--overwrite", action="store_true", help="replace OUT")
    args = parser.parse_args(argv)
    out = convert(args.gguf, args.out, overwrite=args.overwrite)
    print(f"wrote {out} from {args.gguf}")
    if "chat_template" not in json.loads((out / "tokenizer_config.json").read_text()):
        # Training and evaluation render with the base's template and would refuse later,
        # naming the folder but not why it has none.
        print(f"note: {args.gguf} has no chat template (tokenizer.chat_template), which "
              f"sekft-train and sekft-eval need: put the model's in {out / 'chat_template.jinja'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli("sekft.gguf", main))

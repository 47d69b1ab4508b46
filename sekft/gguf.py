"""Import a GGUF file (llama.cpp's format) as an ordinary checkpoint folder.

    python -m sekft.gguf convert SmolLM2-135M-Instruct.Q4_1.gguf build/smollm2-135m-instruct/

writes config.json, model.safetensors (float32: every tensor dequantized by the `gguf`
package, llama.cpp's own reader, optional extra `sekft[gguf]`), tokenizer.json and
tokenizer_config.json (the GGUF's chat template and special tokens), which `load_base` and
every sekft command read like any Hugging Face folder.

What llama.cpp's converter (convert_hf_to_gguf.py) changed and this module undoes:
- tensor names (`blk.3.attn_q.weight` for `model.layers.3.self_attn.q_proj.weight`);
- the rows of a llama Q and K projection, reordered so that each head's rotary pairs are
  adjacent (GGML's "normal" rope) instead of half a head apart (Hugging Face's rotate_half);
  qwen2 uses the NEOX rope, whose pairs are already half a head apart, and is not reordered;
- the tokenizer, flattened into token strings, merges and token types, rebuilt here with
  `tokenizers` (the pre-tokenizer comes from `tokenizer.ggml.pre`).

The folder is written under a temporary name next to OUT and renamed into place, so a
failure (a truncated file, an unsupported tensor type) leaves no half-written folder.
"""

from __future__ import annotations

import argparse
import os
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
from sekft.rundir import replace_dir, write_json_atomic
from sekft.tokenizer import QWEN2_SPLIT_REGEX

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")

# llama.cpp's token types (gguf.TokenType): control tokens are special added tokens,
# user-defined ones are added tokens matched whole but not special.
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4

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


def _require(meta: dict, key: str, path: Path) -> Any:
    if key not in meta:
        raise CheckpointError(f"{path}: metadata field {key!r} is missing")
    return meta[key]


def hf_config(meta: dict, path: Path, tied: bool, embedding_rows: int | None = None) -> dict:
    """config.json for the model the metadata describes (llama or qwen2).

    `tied`: the file has no `output.weight`, so the lm_head is the embedding matrix.
    `embedding_rows`: rows of `token_embd.weight`, the vocabulary size when the file pads
    its embeddings beyond its token list (else `{arch}.vocab_size`, else the token count).
    """
    arch = _require(meta, "general.architecture", path)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"{path}: architecture {arch!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
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
    tokens = _require(meta, "tokenizer.ggml.tokens", path)
    config = {
        "architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"],
        "model_type": arch,
        "vocab_size": embedding_rows or int(key("vocab_size", len(tokens))),
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
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
    for name in ("bos", "eos", "padding"):
        value = meta.get(f"tokenizer.ggml.{name}_token_id")
        if value is not None:
            config[f"{'pad' if name == 'padding' else name}_token_id"] = int(value)
    return config


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


def read_tensors(reader, config: dict, path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the file, dequantized, renamed and (llama Q/K) un-permuted."""
    tensors = {}
    for tensor in reader.tensors:
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
    if pre == "qwen2":
        return normalizers.NFC(), pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    raise CheckpointError(
        f"{path}: tokenizer.ggml.pre {pre!r} is not supported; supported: gpt-2, smollm, qwen2"
    )


def build_tokenizer(meta: dict, path: Path) -> Tokenizer:
    """The byte-level BPE the metadata describes (`tokenizer.ggml.model` "gpt2").

    Token ids are positions in `tokenizer.ggml.tokens`; control tokens become special added
    tokens, user-defined ones plain added tokens; `add_bos_token` adds a BOS post-processor.
    """
    model = _require(meta, "tokenizer.ggml.model", path)
    if model != "gpt2":
        raise CheckpointError(
            f"{path}: tokenizer.ggml.model {model!r} is not supported; supported: gpt2 "
            "(byte-level BPE)"
        )
    tokens = _require(meta, "tokenizer.ggml.tokens", path)
    types = meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in _require(meta, "tokenizer.ggml.merges", path)]
    normalizer, pre = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"), path)
    vocab = {token: i for i, token in enumerate(tokens)}
    try:
        tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
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
    tokenizer.add_special_tokens([
        AddedToken(tokens[i], normalized=False, special=True)
        for i, kind in enumerate(types) if kind == TOKEN_CONTROL
    ])
    tokenizer.add_tokens([
        AddedToken(tokens[i], normalized=False, special=False)
        for i, kind in enumerate(types) if kind == TOKEN_USER_DEFINED
    ])
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token") and bos is not None:
        text = tokens[bos]
        tokenizer.post_processor = TemplateProcessing(
            single=f"{text} $A", pair=f"{text} $A {text} $B", special_tokens=[(text, bos)]
        )
    return tokenizer


def tokenizer_config(meta: dict) -> dict:
    """tokenizer_config.json: the named special tokens, the added tokens, the chat template."""
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or []
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "added_tokens_decoder": {
            str(i): {"content": tokens[i], "lstrip": False, "normalized": False,
                     "rstrip": False, "single_word": False, "special": kind == TOKEN_CONTROL}
            for i, kind in enumerate(types) if kind in (TOKEN_CONTROL, TOKEN_USER_DEFINED)
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
    names = {t.name: t for t in reader.tensors}
    embedding = names.get("token_embd.weight")
    # GGUF lists dimensions innermost first: token_embd is [hidden, vocab].
    rows = int(embedding.shape[-1]) if embedding is not None else None
    config = hf_config(meta, source, "output.weight" not in names, rows)
    tokenizer = build_tokenizer(meta, source)
    tensors = read_tensors(reader, config, source)

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
    convert_parser.add_argument("gguf", help="the .gguf file (llama or qwen2)")
    convert_parser.add_argument("out", help="the checkpoint folder to create")
    convert_parser.add_argument("--overwrite", action="store_true", help="replace OUT")
    args = parser.parse_args(argv)
    out = convert(args.gguf, args.out, overwrite=args.overwrite)
    print(f"wrote {out} from {args.gguf}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli("sekft.gguf", main))

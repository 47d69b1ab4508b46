"""Load a base model: checkpoint folder (or cached hub id) -> our Decoder, tokenizer, template.

    from sekft import load_base
    base = load_base("HuggingFaceTB/SmolLM2-135M-Instruct", load_4bit=True)
    logits = base.model(torch.tensor([base.tokenizer.encode("ls").ids]))

Weights are read one tensor at a time straight into the target dtype and device, so two
full copies of the model never exist. On CPU, a tensor stored in the target dtype is used
in place: it stays backed by the checkpoint's memory map (copy-on-write), costing no
anonymous memory, sharing the page cache with other processes, and reading from disk only
what a forward touches. `python -m sekft.base BASE` loads one and prints a summary.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import nn

from sekft import quant
from sekft.checkpoint import read_config, read_tensor, resolve_base, tensor_index
from sekft.device import DTYPE_CHOICES, choose_dtype, default_device, default_dtype, describe
from sekft.errors import CheckpointError, ConfigError, run_cli
from sekft.model import Decoder, ModelConfig
from sekft.template import find_templates
from sekft.tokenizer import load_special_tokens, load_tokenizer

# The linear layers of the decoder blocks: quantized under load_4bit, LoRA's usual targets.
BLOCK_LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)$")

# Tensors some checkpoints carry that the model recomputes instead (old Llama exports).
IGNORED_TENSORS = re.compile(r".*rotary_emb\.inv_freq$")


@dataclass
class Base:
    """A loaded base: the model, its tokenizer, its raw chat template and where it came from."""

    model: Decoder
    tokenizer: Tokenizer
    chat_template: str | None
    special_tokens: dict[str, str]
    config: ModelConfig
    path: Path
    hf_config: dict


def load_base(
    base: str | Path,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    load_4bit: bool = False,
    compute_dtype: torch.dtype | None = None,
) -> Base:
    """Load BASE (a checkpoint folder or a hub id in the local HF cache) for frozen use.

    dtype: of the floating-point weights (default: `sekft.device.default_dtype`, bf16 where
    the device multiplies bf16 natively, else float32).
    load_4bit: NF4 with double quantization for the block linears, computing in
    `compute_dtype` (default as dtype). All parameters are frozen (requires_grad False).
    """
    folder = resolve_base(str(base))
    hf_config = read_config(folder)
    config = ModelConfig.from_hf(hf_config, source=str(folder / "config.json"))
    model = load_model(folder, config, dtype, device, load_4bit, compute_dtype)
    templates = find_templates(folder)
    template = templates.get("default") or next(iter(templates.values()), None)
    return Base(
        model=model,
        tokenizer=load_tokenizer(folder),
        chat_template=template,
        special_tokens=load_special_tokens(folder),
        config=config,
        path=folder,
        hf_config=hf_config,
    )


def load_model(
    folder: Path,
    config: ModelConfig,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    load_4bit: bool = False,
    compute_dtype: torch.dtype | None = None,
) -> Decoder:
    """The Decoder for `config` with its weights read from `folder`, frozen, in eval mode.

    Every tensor's name and shape is checked against the config before any data is read.
    """
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    compute_dtype = compute_dtype or dtype
    index = tensor_index(folder)
    with torch.device("meta"):
        model = Decoder(config)
    wanted = dict(model.named_parameters(remove_duplicate=False))
    if config.tie_embeddings:
        # Tied: lm_head is the embedding matrix (a stored copy must equal it: check_tied_head).
        del wanted["lm_head.weight"]
    check_tensors(folder, config, index, wanted)
    if config.tie_embeddings:
        check_tied_head(index)

    for module_name, module in list(model.named_modules()):
        if load_4bit and BLOCK_LINEAR.match(module_name):
            bias = read_tensor(index[module_name + ".bias"]) if module.bias is not None else None
            weight = read_tensor(index[module_name + ".weight"])
            model.set_submodule(
                module_name, quant.quantize_linear(weight, bias, device, compute_dtype)
            )
            del weight, bias
            quant.release_freed_host_memory()
            continue
        for leaf in list(module._parameters):
            name = f"{module_name}.{leaf}" if module_name else leaf
            if name in wanted:
                tensor = read_tensor(index[name]).to(device=device, dtype=dtype)
                setattr(module, leaf, nn.Parameter(tensor, requires_grad=False))
    if config.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def check_tensors(folder: Path, config: ModelConfig, index: dict, wanted: dict) -> None:
    """Raise CheckpointError unless the stored tensors are exactly the ones `config` implies."""
    described = (
        f"config.json ({config.model_type}, {config.num_layers} layers, "
        f"hidden {config.hidden_size})"
    )
    for name, param in wanted.items():
        info = index.get(name)
        if info is None:
            raise CheckpointError(
                f"{folder}: tensor {name!r} is missing, but {described} needs it; "
                "the weights are incomplete or belong to another config"
            )
        if info.shape != tuple(param.shape):
            raise CheckpointError(
                f"{info.file}: tensor {name!r} has shape {list(info.shape)}, but {described} "
                f"implies {list(param.shape)}; the config and the weights disagree"
            )
        if not info.dtype.is_floating_point:
            raise CheckpointError(
                f"{info.file}: tensor {name!r} is {info.dtype}, not floating point"
            )
    extra = sorted(
        n
        for n in index
        if n not in wanted and n != "lm_head.weight" and not IGNORED_TENSORS.match(n)
    )
    if extra:
        raise CheckpointError(
            f"{index[extra[0]].file}: tensor {extra[0]!r} (and {len(extra) - 1} more) has no "
            f"place in {described}; config.json and the weights disagree, or the weights are "
            f"of a {config.model_type} variant sekft does not support"
        )


def check_tied_head(index: dict) -> None:
    """Raise CheckpointError when a tied checkpoint also stores an `lm_head.weight` that is
    not the embedding matrix.

    Such a head is one stack's model and not another's: transformers 5 keeps the stored head
    (and warns), transformers 4 and vLLM tie it to the embeddings. A stored copy equal to the
    embeddings is harmless. Reads both tensors once, through the memory map.
    """
    head = index.get("lm_head.weight")
    if head is None:
        return
    embed = index["model.embed_tokens.weight"]
    same_kind = (head.shape, head.dtype) == (embed.shape, embed.dtype)
    if same_kind and torch.equal(read_tensor(head), read_tensor(embed)):
        return
    raise CheckpointError(
        f"{head.file}: tensor 'lm_head.weight' differs from 'model.embed_tokens.weight', but "
        "config.json has tie_word_embeddings true, so transformers 5 would use the stored "
        "head and vLLM the embeddings; set tie_word_embeddings to false to use the stored "
        "head, or delete lm_head.weight to use the embeddings"
    )


def parameter_count(model: nn.Module) -> int:
    """Parameters as the checkpoint counts them: a 4-bit weight counts its unpacked size."""
    total = 0
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if name == "weight" and quant.is_4bit(module):
                total += module.in_features * module.out_features
            else:
                total += param.numel()
    if model.config.tie_embeddings:
        total -= model.lm_head.weight.numel()
    return total


def _summary(base: Base, seconds: float, load_4bit: bool) -> str:
    c = base.config
    window = {w for w in c.sliding_windows if w is not None}
    lines = [
        f"base        {base.path}",
        f"model_type  {c.model_type}  layers {c.num_layers}  hidden {c.hidden_size}  "
        f"mlp {c.intermediate_size}  vocab {c.vocab_size}",
        f"attention   {c.num_heads} heads, {c.num_kv_heads} kv heads, head_dim {c.head_dim}"
        + (f", sliding window {sorted(window)}" if window else "")
        + (", q/k/v" + ("/o" if c.o_bias else "") + " bias" if c.qkv_bias else "")
        + (", q/k norm" if c.qk_norm else ""),
        f"rope        theta {c.rope_theta:g}" + (f", {c.rope_scaling}" if c.rope_scaling else ""),
        f"tied        {c.tie_embeddings}",
        f"params      {parameter_count(base.model) / 1e6:.1f}M",
        f"weights     {quant.model_bytes(base.model) / 1e6:.1f} MB"
        + (" (NF4 block linears)" if load_4bit else f" ({next(base.model.parameters()).dtype})"),
        f"tokenizer   {base.tokenizer.get_vocab_size()} tokens; special {base.special_tokens}",
        f"template    {'yes' if base.chat_template else 'none'}"
        + (f" ({len(base.chat_template)} chars)" if base.chat_template else ""),
        f"load time   {seconds:.2f} s",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sekft.base", description="Load a base model and print a summary."
    )
    parser.add_argument("base", help="checkpoint folder, or org/name in the local HF cache")
    parser.add_argument("--load-4bit", action="store_true", help="NF4 block linears")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                        help="weight dtype (default: auto, bf16 where the device has native bf16)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device}: CUDA is not available here")
    device = torch.device(args.device) if args.device else default_device()
    dtype, why = choose_dtype(device, args.dtype)
    print(describe(device, dtype, why))
    base = load_base(args.base, dtype=dtype, device=device, load_4bit=args.load_4bit)
    print(_summary(base, time.perf_counter() - start, args.load_4bit))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli("sekft.base", main))

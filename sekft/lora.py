"""LoRA on our decoder's linear layers, float or 4-bit, saved and loaded in PEFT's format.

A `LoRALinear` replaces a target projection (`q_proj`, ..., `down_proj`) in place. It keeps
the wrapped layer's own `weight` and `bias` Parameter objects registered under the same
names, so the model's base state_dict keys stay the checkpoint's
(`model.layers.0.self_attn.q_proj.weight`) and loading a base stays a name-to-name copy; the
adapter adds `lora_A.weight` (r x in) and `lora_B.weight` (out x r) next to them. PEFT names
the same tensors `base_model.model.` + our name, which is all `save_adapter` and
`load_adapter` translate.

`load_adapter` takes what PEFT writes: safetensors or the older `adapter_model.bin`, layers
chosen as PEFT chooses them (target_modules as names, a regex or "all-linear",
exclude_modules, layers_to_transform), per-layer rank_pattern/alpha_pattern. A config field
that would change the adapter's output and that sekft does not implement (DoRA, biases,
modules_to_save, a PiSSA-style init, replicated layers, ...) is refused by name, never ignored.

    y = base(x) + scaling * B(A(dropout(x))),   scaling = alpha / r  (alpha / sqrt(r): rsLoRA)

A starts Kaiming-uniform and B at zero (as PEFT), so a fresh adapter leaves outputs unchanged.
The base layer runs its own forward (`sekft.quant.NF4Linear` included) and stays frozen;
only LoRA parameters are trainable. LoRA weights live in float32 by default whatever the base
dtype (as PEFT's `autocast_adapter_dtype`). Under autocast the update is computed in the
autocast dtype and added to the base output in place; without it, in the LoRA weights' dtype
(the input is cast to it and the update back).

    python -m sekft.lora check ADAPTER     # does sekft load it, would vLLM?
    python -m sekft.lora merge --base BASE --adapter ADAPTER --out DIR   # one float checkpoint

`merge` writes the dtype the base's weights are stored in, unless `--dtype` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import re
import shutil
import sys
import tempfile
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from sekft.errors import AdapterError, run_cli
from sekft.quant import dequantized_weight, is_4bit

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# What PEFT wrote before safetensors became its default (a torch pickle of the same dict).
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
# The output layer: never a LoRA target here. sekft's loss reads its weight directly (chunked,
# `Decoder.output_weight`), so LoRA on it would silently not train, and a tied lm_head would
# merge its update into the input embeddings too. PEFT's "all-linear" leaves it out as well.
OUTPUT_LAYER = "lm_head"
# vLLM's default --max-lora-rank; a larger adapter is refused unless the server raises it.
VLLM_MAX_LORA_RANK = 16
# Files a merged export copies from the base folder when present, so the export is a complete
# base of its own (config.json is rewritten, not copied).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "tokenizer.model",
    "generation_config.json",
)


def lora_scaling(r: int, alpha: float, rslora: bool = False) -> float:
    """The factor on B @ A: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA (rank-stabilised)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def lora_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The weight update a LoRA pair adds: `scaling * B @ A`.

    lora_A [r, in], lora_B [out, r] -> [out, in], in float32 whatever their dtype, so merging
    into a bf16 weight rounds once, at the end.
    """
    return scaling * (lora_B.float() @ lora_A.float())


class LoRALinear(nn.Module):
    """A frozen linear layer (`nn.Linear` or 4-bit `NF4Linear`) plus a LoRA update.

    `weight`/`bias` are the wrapped layer's own Parameters (no copy), registered here so
    state_dict keys keep the layer's name. The wrapped layer itself is deliberately not a
    registered submodule (that would put `base_layer.` into every key); it is kept only to
    run its forward, and `_apply`, `train` and `_save_to_state_dict` defer to it.
    """

    def __init__(
        self,
        base: nn.Linear,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        object.__setattr__(self, "base_layer", base)
        self.weight = base.weight
        self.bias = base.bias
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.r = r
        self.alpha = alpha
        self.rslora = rslora
        self.scaling = lora_scaling(r, alpha, rslora)
        device = base.weight.device
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        # nn.Linear already drew A Kaiming-uniform (a=sqrt(5)), as PEFT does.
        nn.init.zeros_(self.lora_B.weight)
        self.merged = False

    @property
    def dropout(self) -> float:
        return self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or id(self) in _disabled_here():
            return self.base_layer(x)
        # Flattened to [N, in] so the update can be one GEMM into the base output below.
        flat = x.reshape(-1, self.in_features)
        result = self.base_layer(flat)
        device = flat.device.type
        if torch.is_autocast_enabled(device):
            # The update is computed in the autocast dtype, as the base's product is; the
            # float32 LoRA weights are cast per call (r rows: cheap) and get float32 grads.
            dtype = torch.get_autocast_dtype(device)
        else:
            dtype = self.lora_A.weight.dtype
        a, b = self.lora_A.weight.to(dtype), self.lora_B.weight.to(dtype)
        # Scaled at rank r, where the tensor is out_features / r times smaller than the output.
        down = nn.functional.linear(self.lora_dropout(flat.to(dtype)), a) * self.scaling
        if result.dtype == dtype:
            # Accumulated into the base output in place (its backward needs only the incoming
            # gradient): `result + lora_B(down)` writes a [N, out] tensor and reads it back,
            # which cost a fifth as much as the gate/up projection itself on CPU.
            result = result.addmm_(down, b.t())
        else:
            result = result + (down @ b.t()).to(result.dtype)
        return result.view(*x.shape[:-1], self.out_features)

    def delta(self) -> torch.Tensor:
        """This layer's weight update [out, in] in float32 (see `lora_delta`)."""
        return lora_delta(self.lora_A.weight.detach(), self.lora_B.weight.detach(), self.scaling)

    def _apply(self, fn: Callable, recurse: bool = True) -> LoRALinear:
        # The base layer knows how to move its weight (bitsandbytes moves a Params4bit's
        # quant_state with it); re-point our registrations at whatever it ends up holding.
        self.base_layer._apply(fn, recurse)
        self._parameters["weight"] = self.base_layer.weight
        self._parameters["bias"] = self.base_layer.bias
        for child in self.children():
            child._apply(fn, recurse)
        return self

    def train(self, mode: bool = True) -> LoRALinear:
        self.base_layer.train(mode)
        return super().train(mode)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        # Exactly the wrapped layer's entries (an NF4Linear adds its quant_state tensors);
        # the LoRA children add theirs through the normal recursion.
        self.base_layer._save_to_state_dict(destination, prefix, keep_vars)

    def extra_repr(self) -> str:
        kind = "4-bit" if is_4bit(self.base_layer) else str(self.weight.dtype)
        return (
            f"in={self.in_features}, out={self.out_features}, base={kind}, r={self.r}, "
            f"alpha={self.alpha}, rslora={self.rslora}, merged={self.merged}"
        )


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRA-wrapped layer of `model` by module name, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _require_lora(model: nn.Module, what: str) -> dict[str, LoRALinear]:
    modules = lora_modules(model)
    if not modules:
        raise AdapterError(f"{what}: the model has no LoRA layers; call attach_lora first")
    return modules


def _matches(name: str, targets: Iterable[str]) -> str | None:
    """The target a module name matches, PEFT-style: equal, or ending in '.' + target."""
    for target in targets:
        if name == target or name.endswith("." + target):
            return target
    return None


def find_targets(model: nn.Module, targets: Iterable[str]) -> dict[str, nn.Linear]:
    """The linear layers of `model` that `targets` name (PEFT's suffix rule), by module name.

    Raises AdapterError for a target that matches no module, or matches one that is not a
    linear layer or is the output layer (`OUTPUT_LAYER`), naming the target and what the model
    does have.
    """
    targets = list(targets)
    if not targets:
        raise AdapterError("LoRA targets are empty: name at least one module, e.g. q_proj")
    found: dict[str, nn.Linear] = {}
    hit: set[str] = set()
    for name, module in model.named_modules():
        target = _matches(name, targets)
        if target is None or isinstance(module, LoRALinear):
            continue
        if name == OUTPUT_LAYER:
            raise AdapterError(
                f"LoRA target {target!r} matches {name}, the output layer: sekft trains LoRA on "
                "the decoder's linear layers only (its loss reads the lm_head weight directly)"
            )
        if not isinstance(module, nn.Linear):
            raise AdapterError(
                f"LoRA target {target!r} matches {name}, a {type(module).__name__}; "
                "only linear layers (nn.Linear, 4-bit NF4Linear) take LoRA"
            )
        found[name] = module
        hit.add(target)
    missing = [t for t in targets if t not in hit]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if isinstance(m, (nn.Linear, LoRALinear))})
        raise AdapterError(
            f"unknown LoRA target module(s) {missing}: no module of the model is named so; "
            f"its linear layers are {linear}"
        )
    return found


def attach_lora(
    model: nn.Module,
    r: int,
    alpha: float,
    dropout: float = 0.0,
    targets: Iterable[str] = DEFAULT_TARGETS,
    rslora: bool = False,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> dict[str, LoRALinear]:
    """Wrap every target linear layer of `model` in a `LoRALinear`, in place.

    Contract:
    - Every parameter of `model` is frozen; only the new `lora_A`/`lora_B` weights train.
    - A is initialised as `reset_lora(model, seed)` does and B is zero, so the model's
      outputs are unchanged until B trains.
    - LoRA weights are created in `dtype` on each base layer's device.
    - Raises AdapterError if the model already has LoRA layers, for r < 1 or a dropout outside
      [0, 1), and for targets that match no linear layer (`find_targets`).
    Returns the wrapped layers by module name.
    """
    if lora_modules(model):
        raise AdapterError("attach_lora: the model already has LoRA layers; attach once")
    if not isinstance(r, int) or r < 1:
        raise AdapterError(f"LoRA rank r must be a positive integer, got {r!r}")
    if not 0.0 <= dropout < 1.0:
        raise AdapterError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    found = find_targets(model, targets)
    _wrap(model, {name: (layer, r, alpha) for name, layer in found.items()}, dropout, rslora, dtype)
    reset_lora(model, seed)
    return lora_modules(model)


def _wrap(
    model: nn.Module,
    layers: dict[str, tuple[nn.Linear, int, float]],
    dropout: float,
    rslora: bool,
    dtype: torch.dtype = torch.float32,
) -> dict[str, LoRALinear]:
    """Freeze `model` and wrap each named linear layer with its own (rank, alpha)."""
    for param in model.parameters():
        param.requires_grad_(False)
    for name, (layer, r, alpha) in layers.items():
        # New layers follow the model's mode: an eval-mode model must not get LoRA dropout.
        wrapped = LoRALinear(layer, r, alpha, dropout, rslora, dtype).train(model.training)
        model.set_submodule(name, wrapped)
    return lora_modules(model)


def detach_lora(model: nn.Module) -> None:
    """Put every wrapped layer back as it was, dropping the LoRA weights (unmerged first if
    merged), e.g. before a resident base takes adapters of another rank or targets. The base
    stays frozen. A model without LoRA layers is left as it is."""
    modules = lora_modules(model)
    if modules:
        unmerge_lora(model)
    for name, module in modules.items():
        model.set_submodule(name, module.base_layer)


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The LoRA weights of `model` by parameter name (`...q_proj.lora_A.weight`): what an
    optimizer takes, and all that an adapter file holds."""
    return {
        f"{name}.{part}.weight": getattr(module, part).weight
        for name, module in lora_modules(model).items()
        for part in ("lora_A", "lora_B")
    }


def _logical_numel(param: torch.Tensor) -> int:
    # A Params4bit stores two 4-bit values per byte; count the weights it stands for.
    quant_state = getattr(param, "quant_state", None)
    return quant_state.shape.numel() if quant_state is not None else param.numel()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as the weights they encode."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(_logical_numel(p) for p in model.parameters())
    return trainable, total


@torch.no_grad()
def reset_lora(model: nn.Module, seed: int) -> None:
    """Re-initialise every adapter as fresh: A Kaiming-uniform (a=sqrt(5), PEFT's and
    nn.Linear's choice) drawn from `seed` on the CPU so it is the same on any device, B zero.

    Raises AdapterError when the model has no LoRA layers or any is merged.
    """
    modules = _require_lora(model, "reset_lora")
    _refuse_merged(modules, "reset_lora")
    generator = torch.Generator().manual_seed(seed)
    for module in modules.values():
        a = torch.empty(module.lora_A.weight.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        module.lora_A.weight.copy_(a)
        module.lora_B.weight.zero_()


@torch.no_grad()
def zero_lora(model: nn.Module) -> None:
    """Set A and B of every adapter to zero: an empty slot that leaves outputs unchanged
    (and stays zero under training, since each factor's gradient goes through the other;
    call `reset_lora` before training)."""
    modules = _require_lora(model, "zero_lora")
    _refuse_merged(modules, "zero_lora")
    for module in modules.values():
        module.lora_A.weight.zero_()
        module.lora_B.weight.zero_()


def _refuse_merged(modules: dict[str, LoRALinear], what: str) -> None:
    merged = [name for name, m in modules.items() if m.merged]
    if merged:
        raise AdapterError(f"{what}: LoRA is merged into {merged[0]} (and others); unmerge first")


# LoRA layers disabled by `lora_disabled`, per thread: {id(layer): nesting depth}.
_disabled = threading.local()


def _disabled_here() -> Counter:
    counts = getattr(_disabled, "counts", None)
    if counts is None:
        counts = _disabled.counts = Counter()
    return counts


@contextmanager
def lora_disabled(model: nn.Module) -> Iterator[None]:
    """Within the block, forwards run by this thread compute the base alone (the LoRA branch
    is skipped); other threads keep the adapter.

    Per thread because the evaluator runs base-only and adapter episodes concurrently on one
    model: a flag on the layers would switch the adapter off under the other episodes too.
    (A checkpointed backward recomputes on autograd's threads: use this for inference.)
    Raises AdapterError when the adapters are merged: the base weights then hold them.
    """
    modules = _require_lora(model, "lora_disabled")
    _refuse_merged(modules, "lora_disabled")
    counts = _disabled_here()
    keys = [id(m) for m in modules.values()]
    counts.update(keys)
    try:
        yield
    finally:
        counts.subtract(keys)
        for key in keys:
            if counts[key] <= 0:
                del counts[key]


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Add each adapter into its float base weight (W += scaling * B @ A), so the forward
    no longer pays for the LoRA branch. Already-merged layers are left alone.

    4-bit layers cannot be merged in place (requantizing would both lose the update's
    precision and change the frozen base): use `export_merged` for a merged float checkpoint.
    """
    modules = _require_lora(model, "merge_lora")
    quantized = [name for name, m in modules.items() if is_4bit(m.base_layer)]
    if quantized:
        raise AdapterError(
            f"merge_lora: {quantized[0]} is 4-bit and cannot be merged in place; "
            "use export_merged to write a merged float checkpoint instead"
        )
    for module in modules.values():
        if not module.merged:
            module.weight.add_(module.delta().to(module.weight.dtype))
            module.merged = True


@torch.no_grad()
def unmerge_lora(model: nn.Module) -> None:
    """Undo `merge_lora` (W -= scaling * B @ A). Exact up to float rounding: in float32 the
    original weights come back to ~1e-7; in bf16 each merge/unmerge round trip rounds twice."""
    for module in _require_lora(model, "unmerge_lora").values():
        if module.merged:
            module.weight.sub_(module.delta().to(module.weight.dtype))
            module.merged = False


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write `path` through `write(temp_path)` on a temp file in the same folder, then rename:
    readers see the old file or the whole new one, never part of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_json(path: Path, data: dict) -> None:
    _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True)))


def adapter_config(
    modules: dict[str, LoRALinear], base_name: str | None, targets: list[str] | None = None
) -> dict:
    """The adapter_config.json PEFT writes for these LoRA layers (LoRA, causal LM, no bias,
    no DoRA, no modules_to_save). Only fields PEFT has known since 0.10 are written, so older
    PEFT versions load it too. `target_modules` is `targets`, by default the layers' last
    name parts (`q_proj`, ...); see `saved_targets`."""
    first = next(iter(modules.values()))
    setting = (first.r, first.alpha, first.rslora, first.dropout)
    for name, m in modules.items():
        if (m.r, m.alpha, m.rslora, m.dropout) != setting:
            raise AdapterError(
                f"LoRA layers disagree: {name} has r={m.r}, alpha={m.alpha}, rslora={m.rslora}, "
                f"dropout={m.dropout}, unlike the others; save_adapter writes one setting for "
                "all layers (no rank_pattern or alpha_pattern)"
            )
    if targets is None:
        targets = sorted({name.rsplit(".", 1)[-1] for name in modules})
    return {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": base_name,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": first.alpha,
        "lora_dropout": first.dropout,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": first.r,
        "rank_pattern": {},
        "revision": None,
        "target_modules": targets,
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": first.rslora,
    }


def saved_targets(model: nn.Module, modules: dict[str, LoRALinear]) -> list[str]:
    """`target_modules` for an adapter on `modules`: their last name parts (`q_proj`, ...)
    when those select exactly these layers of `model` (PEFT's suffix rule), else their full
    names (after loading an adapter that used `layers_to_transform`, `exclude_modules` or a
    regex), so that PEFT, vLLM and `load_adapter` see the layers the tensors cover."""
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in modules})
    uncovered = [
        name for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name not in modules and _matches(name, suffixes)
    ]
    return sorted(modules) if uncovered else suffixes


def vllm_warnings(config: dict, max_lora_rank: int = VLLM_MAX_LORA_RANK) -> list[str]:
    """Why vLLM would refuse an adapter with this adapter_config.json content (empty: it
    would load it). `max_lora_rank` is the server's --max-lora-rank (vLLM's default 16)."""
    found = []
    if config.get("r", 0) > max_lora_rank:
        found.append(
            f"rank r={config['r']} is above vLLM's --max-lora-rank {max_lora_rank}: "
            f"start vLLM with --max-lora-rank {config['r']} or more"
        )
    if config.get("modules_to_save"):
        found.append(f"modules_to_save={config['modules_to_save']}: vLLM supports none")
    if config.get("bias", "none") != "none":
        found.append(f"bias={config['bias']!r}: vLLM needs bias 'none' (or --enable-lora-bias)")
    if config.get("use_dora"):
        found.append("use_dora: vLLM does not support DoRA adapters")
    for field in ("rank_pattern", "alpha_pattern"):
        if config.get(field):
            # vLLM's PEFTHelper reads r and lora_alpha only: every layer gets alpha / r.
            found.append(f"{field}={config[field]}: vLLM ignores it and scales every layer "
                         "by lora_alpha / r")
    return found


def save_adapter(
    model: nn.Module,
    out_dir: str | Path,
    base_name: str | None,
    max_lora_rank: int = VLLM_MAX_LORA_RANK,
) -> list[str]:
    """Write `adapter_model.safetensors` and `adapter_config.json` into `out_dir` as PEFT does.

    Keys are PEFT's (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), the
    tensors in the LoRA weights' dtype. Each file is written atomically; the weights go
    first, so a crash between the two leaves either the old pair or new weights with the old
    config, which `load_adapter` checks against each other. Warns (and returns the messages)
    where vLLM would refuse the adapter, see `vllm_warnings`.
    """
    modules = _require_lora(model, "save_adapter")
    config = adapter_config(modules, base_name, saved_targets(model, modules))
    tensors = {
        PEFT_PREFIX + name: param.detach().to("cpu").contiguous()
        for name, param in lora_parameters(model).items()
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(
        out_dir / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"})
    )
    _write_json(out_dir / ADAPTER_CONFIG, config)
    found = vllm_warnings(config, max_lora_rank)
    for message in found:
        warnings.warn(f"{out_dir}: vLLM would refuse this adapter: {message}", stacklevel=2)
    return found


# adapter_config.json fields sekft reads and honours (`read_adapter_config`, `adapter_layers`,
# `layer_settings`).
READ_FIELDS = (
    "peft_type", "r", "lora_alpha", "target_modules", "exclude_modules", "layers_to_transform",
    "layers_pattern", "rank_pattern", "alpha_pattern", "use_rslora", "lora_dropout",
    "init_lora_weights",
)
# Fields that do not change what a loaded adapter computes: metadata, and settings PEFT uses
# only to create or train one (each init config matters only with its `init_lora_weights`,
# refused below when it rewrote the base; `ensure_weight_tying` only with embedding targets).
IGNORED_FIELDS = (
    "base_model_name_or_path", "revision", "task_type", "inference_mode", "peft_version",
    "auto_mapping", "megatron_config", "megatron_core", "qalora_group_size", "loftq_config",
    "eva_config", "corda_config", "astra_config", "lora_ga_config", "runtime_config",
    "ensure_weight_tying",
)
# Features sekft does not implement, each with the values that mean "off". A set one changes
# the adapter's output (DoRA's magnitudes, trained biases, replaced or replicated modules,
# aLoRA's token-dependent activation, ...), so loading the plain LoRA part would be wrong.
UNSUPPORTED_FIELDS = {
    "use_dora": (False, None),
    "bias": ("none", None),
    "modules_to_save": (None, []),
    "fan_in_fan_out": (False, None),
    "lora_bias": (False, None),
    "layer_replication": (None, []),
    "trainable_token_indices": (None, [], {}),
    "target_parameters": (None, []),
    "use_qalora": (False, None),
    "alora_invocation_tokens": (None, []),
    "velora_config": (None,),
    "monteclora_config": (None,),
    "use_bdlora": (None, False),
    "arrow_config": (None,),
    "kasa_config": (None,),
}
# `init_lora_weights` values that only initialise A and B. The others (PiSSA, OLoRA, CorDA,
# Astra, LoftQ, LoRA-GA) also rewrite the base weights, and PEFT redoes that when it loads
# the adapter: on the unchanged base such an adapter is wrong (logits off by ~2-4 on a tiny
# model) until PEFT converts it (`path_initial_model_for_weight_conversion`).
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "nora", "mica")
# A field this version of sekft does not know is accepted only with one of these values.
EMPTY_VALUES = (None, False, 0, "", [], {})


def _is_in(value: object, allowed: Iterable[object]) -> bool:
    # Equality that tells True from 1 and False from 0 (JSON does, Python's `in` does not).
    return any(type(value) is type(a) and value == a for a in allowed)


def _field_error(path: Path, field: str, value: object, why: str) -> AdapterError:
    return AdapterError(f"{path}: field {field!r} is {value!r}; {why}")


def _check_pattern(path: Path, field: str, value: object) -> None:
    """A regex string (PEFT's `re.fullmatch` over module names), or raise AdapterError."""
    try:
        re.compile(value)
    except re.error as e:
        raise _field_error(path, field, value, f"not a valid regular expression ({e})") from e


def _check_names(path: Path, field: str, value: object, regex: bool) -> None:
    """A list of module names, or (`regex`) one regex string; raise AdapterError if not."""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return
    if regex and isinstance(value, str):
        _check_pattern(path, field, value)
        return
    kind = "a list of module names or a regex string" if regex else "a list of module names"
    raise _field_error(path, field, value, f"sekft needs {kind}")


def _check_read_fields(path: Path, config: dict) -> None:
    """Raise AdapterError for a value of a `READ_FIELDS` field that sekft cannot honour."""
    if config.get("peft_type", "LORA") != "LORA":
        raise _field_error(path, "peft_type", config["peft_type"], "sekft loads LORA only")
    r = config["r"]
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise _field_error(path, "r", r, "it must be a positive integer")
    alpha = config["lora_alpha"]
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise _field_error(path, "lora_alpha", alpha, "it must be a number")
    dropout = config.get("lora_dropout") or 0.0
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise _field_error(path, "lora_dropout", dropout, "it must be a number in [0, 1)")
    _check_names(path, "target_modules", config["target_modules"], regex=True)
    if config.get("exclude_modules") is not None:
        _check_names(path, "exclude_modules", config["exclude_modules"], regex=True)
    layers = config.get("layers_to_transform")
    if layers is not None and not (
        (isinstance(layers, int) and not isinstance(layers, bool))
        or (isinstance(layers, list) and all(isinstance(i, int) for i in layers))
    ):
        raise _field_error(path, "layers_to_transform", layers, "sekft needs a layer index "
                           "or a list of them")
    pattern = config.get("layers_pattern")
    if pattern is not None and not isinstance(pattern, str):
        _check_names(path, "layers_pattern", pattern, regex=False)
    for field, kind in (("rank_pattern", int), ("alpha_pattern", (int, float))):
        value = config.get(field) or {}
        if not isinstance(value, dict) or not all(
            isinstance(v, kind) and not isinstance(v, bool) and v > 0 for v in value.values()
        ):
            raise _field_error(path, field, value, "sekft needs {module name regex: positive "
                               "number}")
        for key in value:
            _check_pattern(path, field, key)
    init = config.get("init_lora_weights", True)
    if not _is_in(init, PLAIN_INITS):
        raise _field_error(
            path, "init_lora_weights", init,
            "that initialisation rewrote the base weights, so the adapter is only right on "
            "that rewritten base; convert it to plain LoRA with PEFT "
            "(save_pretrained(..., path_initial_model_for_weight_conversion=...))",
        )


def read_adapter_config(adapter_dir: Path) -> dict:
    """adapter_config.json of a LoRA adapter folder, checked for what sekft can load.

    Contract: every field is honoured (`READ_FIELDS`), irrelevant to the loaded adapter
    (`IGNORED_FIELDS`), off (`UNSUPPORTED_FIELDS`), or unknown to sekft and empty
    (`EMPTY_VALUES`: None, false, 0, "", [], {}); anything else raises AdapterError naming
    the file and the field, so no setting that changes the adapter's output is silently
    dropped.
    """
    path = adapter_dir / ADAPTER_CONFIG
    if not adapter_dir.is_dir():
        raise AdapterError(f"adapter folder {adapter_dir} does not exist")
    if not path.is_file():
        raise AdapterError(f"{path}: missing; an adapter folder holds {ADAPTER_CONFIG} "
                           f"and {ADAPTER_WEIGHTS} (as PEFT's save_pretrained writes)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: not valid JSON ({e}); re-save the adapter") from e
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: expected a JSON object, got {type(config).__name__}")
    for field in ("r", "lora_alpha", "target_modules"):
        if field not in config:
            raise AdapterError(f"{path}: field {field!r} is missing")
    _check_read_fields(path, config)
    for field, value in config.items():
        if field in READ_FIELDS or field in IGNORED_FIELDS:
            continue
        if field in UNSUPPORTED_FIELDS:
            allowed = UNSUPPORTED_FIELDS[field]
            if not _is_in(value, allowed):
                raise _field_error(path, field, value, f"sekft supports only {allowed[0]!r} "
                                   "there (plain LoRA on linear layers)")
        elif not _is_in(value, EMPTY_VALUES):
            raise _field_error(
                path, field, value,
                "sekft does not know this field (a newer PEFT feature?) and cannot tell "
                "whether it changes what the adapter computes",
            )
    return config


def adapter_weights_path(adapter_dir: Path) -> Path:
    """The adapter's weights file: `adapter_model.safetensors`, else PEFT's older
    `adapter_model.bin` (PEFT and vLLM read both, safetensors first)."""
    path = adapter_dir / ADAPTER_WEIGHTS
    if not path.is_file() and (adapter_dir / ADAPTER_WEIGHTS_BIN).is_file():
        return adapter_dir / ADAPTER_WEIGHTS_BIN
    return path


def _adapter_key(key: str) -> str:
    """Our parameter name for a PEFT tensor key: without `base_model.model.` and without the
    adapter name PEFT keeps in memory (`lora_A.default.weight`, in files written from a
    PeftModel's own state_dict; PEFT loads those too)."""
    key = key.removeprefix(PEFT_PREFIX)
    for part in ("lora_A", "lora_B"):
        key = key.replace(f".{part}.default.weight", f".{part}.weight")
    return key


def read_adapter_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """The tensors of an adapter folder (`adapter_weights_path`), keys as `_adapter_key`."""
    path = adapter_weights_path(adapter_dir)
    if not path.is_file():
        raise AdapterError(f"{path}: missing (nor is there an {ADAPTER_WEIGHTS_BIN})")
    if path.name == ADAPTER_WEIGHTS_BIN:
        try:
            # weights_only: a pickle may run code; this reads tensors and containers only.
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
            # torch's messages run over several lines; the first says what failed.
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise AdapterError(
                f"{path}: cannot be read as a torch tensor file ({first}); the file is "
                "truncated or corrupt, re-save or re-download the adapter"
            ) from e
        if not isinstance(tensors, dict) or not all(
            isinstance(t, torch.Tensor) for t in tensors.values()
        ):
            raise AdapterError(f"{path}: expected a dict of tensors, as PEFT saves")
    else:
        try:
            with safe_open(path, framework="pt") as f:
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise AdapterError(
                f"{path}: cannot be read as safetensors ({e}); the file is truncated or "
                "corrupt, re-save or re-download the adapter"
            ) from e
    out = {_adapter_key(key): t for key, t in tensors.items()}
    if len(out) != len(tensors):
        raise AdapterError(f"{path}: holds a tensor twice, with and without an adapter name")
    return out


def _layer_index(name: str, layers_pattern: str | list[str] | None) -> int | None:
    """The block index in a module name, as PEFT reads it for `layers_to_transform`: the
    first number after `<pattern>.` (any name part without a pattern)."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def _selects(config: dict, name: str, module: nn.Module) -> bool:
    """Whether PEFT puts this adapter's LoRA on `module`, named `name` (PEFT's
    `check_target_module_exists`): not excluded, and named by `target_modules` (a regex in
    full, an exact name, or a name suffix after a dot, then filtered by
    `layers_to_transform`), or a linear layer but the output layer with "all-linear"."""
    exclude = config.get("exclude_modules")
    if isinstance(exclude, str) and re.fullmatch(exclude, name):
        return False
    if isinstance(exclude, list) and _matches(name, exclude):
        return False
    targets = config["target_modules"]
    if isinstance(targets, str):
        if targets.lower() == "all-linear":
            return isinstance(module, (nn.Linear, LoRALinear)) and name != OUTPUT_LAYER
        return re.fullmatch(targets, name) is not None
    if name in targets:
        return True
    if not _matches(name, targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    index = _layer_index(name, config.get("layers_pattern"))
    return index is not None and index in ([layers] if isinstance(layers, int) else layers)


def adapter_layers(model: nn.Module, config: dict, path: Path) -> dict[str, nn.Module]:
    """The layers of `model` (`nn.Linear`, or `LoRALinear` slots) that an adapter config puts
    LoRA on, by module name, selected as PEFT selects them (`_selects`; with "all-linear",
    every linear layer but the output layer).

    As in PEFT, list entries that name no module are allowed (PEFT saves them as given); the
    tensors decide whether the adapter fits. Raises AdapterError, naming `path` (the config)
    and the field, when nothing is selected, or a selected module is not a linear layer, or
    is the output layer.
    """
    found: dict[str, nn.Module] = {}
    wrapped: list[str] = []
    for name, module in model.named_modules():
        # A slot's own lora_A/lora_B are not base modules.
        if any(name.startswith(prefix + ".") for prefix in wrapped):
            continue
        if isinstance(module, LoRALinear):
            wrapped.append(name)
        if not name or not _selects(config, name, module):
            continue
        targets = config["target_modules"]
        if name == OUTPUT_LAYER or not isinstance(module, (nn.Linear, LoRALinear)):
            what = ("the output layer" if name == OUTPUT_LAYER
                    else f"not a linear layer ({type(module).__name__})")
            raise _field_error(
                path, "target_modules", targets,
                f"it selects {name}, {what}; sekft loads LoRA on the decoder's linear layers only",
            )
        found[name] = module
    if not found:
        base = config.get("base_model_name_or_path")
        raise _field_error(
            path, "target_modules", config["target_modules"],
            "it selects no layer of this model (with exclude_modules and layers_to_transform); "
            f"is the adapter for another base (it names {base!r})?",
        )
    return found


def _pattern_value(patterns: dict | None, name: str, default: float) -> float:
    """The value PEFT gives the module `name` from `rank_pattern`/`alpha_pattern`: that of
    the first key matching the end of the name after a dot (PEFT's `get_pattern_key`)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def layer_settings(config: dict, names: Iterable[str]) -> dict[str, tuple[int, float]]:
    """(rank, alpha) of each named layer: `r` and `lora_alpha`, unless `rank_pattern` or
    `alpha_pattern` says otherwise for it."""
    return {
        name: (
            _pattern_value(config.get("rank_pattern"), name, config["r"]),
            _pattern_value(config.get("alpha_pattern"), name, config["lora_alpha"]),
        )
        for name in names
    }


def _check_adapter_fits(
    path: Path,
    config: dict,
    tensors: dict[str, torch.Tensor],
    layers: dict[str, nn.Module],
    settings: dict[str, tuple[int, float]],
) -> None:
    """Raise AdapterError unless `tensors` are exactly a LoRA pair of each layer's rank."""
    base = config.get("base_model_name_or_path")
    expected = {}
    for name, layer in layers.items():
        r = settings[name][0]
        expected[f"{name}.lora_A.weight"] = (r, layer.in_features)
        expected[f"{name}.lora_B.weight"] = (layer.out_features, r)
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise AdapterError(
            f"{path}: tensor {PEFT_PREFIX}{unknown[0]} matches no LoRA layer of this model "
            f"({len(unknown)} such); is the adapter for another base (it names {base!r})?"
        )
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise AdapterError(
            f"{path}: tensor {PEFT_PREFIX}{missing[0]} is missing ({len(missing)} missing); "
            "the adapter's target_modules promise it"
        )
    for key, shape in expected.items():
        got = tuple(tensors[key].shape)
        if got == shape:
            continue
        rank_dim = 0 if key.endswith("lora_A.weight") else 1
        r = shape[rank_dim]
        if len(got) == 2 and got[rank_dim] != r and got[1 - rank_dim] == shape[1 - rank_dim]:
            raise AdapterError(
                f"{path}: rank mismatch: {ADAPTER_CONFIG} says r={r} but tensor "
                f"{PEFT_PREFIX}{key} has rank {got[rank_dim]}; the two files are not one adapter"
            )
        raise AdapterError(
            f"{path}: tensor {PEFT_PREFIX}{key} has shape {list(got)}, the model needs "
            f"{list(shape)}: the adapter is for another base (it names {base!r})"
        )


@torch.no_grad()
def load_adapter(model: nn.Module, adapter_dir: str | Path) -> dict:
    """Load a PEFT LoRA adapter folder (ours or PEFT's) into `model`; return its config.

    The layers are those PEFT would adapt (`adapter_layers`: target_modules as names, a
    regex or "all-linear", exclude_modules, layers_to_transform), each with its rank and
    alpha (`layer_settings`: rank_pattern, alpha_pattern) and rsLoRA as the config says;
    the tensors come from adapter_model.safetensors or adapter_model.bin.
    If `model` has no LoRA layers they are attached so. If it has (resident slots), they
    must be on exactly those layers with those ranks; alpha and rsLoRA follow the adapter.
    Everything is checked before anything is written, so a failed load leaves the model as
    it was. Raises AdapterError naming the file and what is wrong: a missing or corrupt file,
    a config field sekft cannot honour (`read_adapter_config`), targets that select nothing
    or no linear layer, a rank disagreeing between config and tensors, shapes from another
    base.
    """
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    tensors = read_adapter_tensors(adapter_dir)
    path = adapter_weights_path(adapter_dir)
    slots = lora_modules(model)
    if slots:
        _refuse_merged(slots, "load_adapter")
    layers = adapter_layers(model, config, adapter_dir / ADAPTER_CONFIG)
    settings = layer_settings(config, layers)
    if slots:
        if set(layers) != set(slots):
            want = sorted({name.rsplit(".", 1)[-1] for name in layers})
            have = sorted({name.rsplit(".", 1)[-1] for name in slots})
            raise AdapterError(
                f"{adapter_dir}: adapter targets {len(layers)} layers ({want}) but the model's "
                f"{len(slots)} LoRA layers are on {have}; detach_lora first, or attach the "
                "adapter's targets"
            )
        for name, slot in slots.items():
            r = settings[name][0]
            if slot.r != r:
                raise AdapterError(
                    f"{adapter_dir}: rank mismatch: the adapter has r={r} on {name} but the "
                    f"model's LoRA layer there has r={slot.r}; detach_lora first, or attach r={r}"
                )
    _check_adapter_fits(path, config, tensors, layers, settings)
    rslora = bool(config.get("use_rslora", False))
    if not slots:
        plan = {name: (layer, *settings[name]) for name, layer in layers.items()}
        slots = _wrap(model, plan, config.get("lora_dropout", 0.0) or 0.0, rslora)
    for name, module in slots.items():
        module.alpha = settings[name][1]
        module.rslora = rslora
        module.scaling = lora_scaling(module.r, module.alpha, module.rslora)
        module.lora_A.weight.copy_(tensors[f"{name}.lora_A.weight"])
        module.lora_B.weight.copy_(tensors[f"{name}.lora_B.weight"])
    return config


@torch.no_grad()
def merged_state_dict(
    model: nn.Module, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """The model's weights with every adapter merged in and 4-bit layers dequantized, under
    the checkpoint's names, on the CPU, in `dtype` (default: each tensor's own; a 4-bit
    weight comes back in the dtype it was quantized from). A weight shared by two names
    (tied embeddings) appears once, under the first name: safetensors stores no aliases,
    and transformers and our loader re-tie `lm_head` from `tie_word_embeddings`."""
    out: dict[str, torch.Tensor] = {}
    aliases = {name for name, _ in model.named_parameters(remove_duplicate=False)} - {
        name for name, _ in model.named_parameters()
    }
    lora = lora_modules(model)
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in lora):
            continue
        prefix = f"{name}." if name else ""
        own = dict(module.named_parameters(recurse=False))
        own.update(
            (key, buf) for key, buf in module.named_buffers(recurse=False)
            if key not in module._non_persistent_buffers_set
        )
        if isinstance(module, LoRALinear) or is_4bit(module):
            base = module.base_layer if isinstance(module, LoRALinear) else module
            weight = dequantized_weight(base)
            if isinstance(module, LoRALinear) and not module.merged:
                delta = module.delta().to(weight.device)
                weight = (weight.float() + delta).to(weight.dtype)
            own["weight"] = weight
        for key, tensor in own.items():
            if tensor is None or prefix + key in aliases:
                continue
            tensor = tensor.detach()
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            out[prefix + key] = tensor.to("cpu").contiguous()
    return out


def export_merged(
    model: nn.Module,
    out_dir: str | Path,
    base_dir: str | Path,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a merged float checkpoint folder that our loader and transformers both load.

    `out_dir` gets `model.safetensors` (`merged_state_dict(model, dtype)`), `config.json`
    (the base's, with `torch_dtype` set to what was written) and the base's tokenizer and
    template files (`TOKENIZER_FILES`, those present). Each file is written atomically, the
    weights first. Holds one full float copy of the weights in host memory while writing.
    """
    base_dir = Path(base_dir)
    config_path = base_dir / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError as e:
        raise AdapterError(
            f"export_merged: {config_path} is missing; pass the base checkpoint's folder"
        ) from e
    except json.JSONDecodeError as e:
        raise AdapterError(f"export_merged: {config_path} is not valid JSON ({e})") from e
    state = merged_state_dict(model, dtype)
    floats = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(floats) == 1:
        written = str(next(iter(floats))).removeprefix("torch.")
        config["torch_dtype"] = written
        if "dtype" in config:
            config["dtype"] = written
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(
        out_dir / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": "pt"})
    )
    _write_json(out_dir / "config.json", config)
    for name in TOKENIZER_FILES:
        source = base_dir / name
        if source.is_file():
            _atomic_write(out_dir / name, lambda tmp, src=source: shutil.copyfile(src, tmp))
    return out_dir


def check_adapter(adapter_dir: str | Path, max_lora_rank: int = VLLM_MAX_LORA_RANK) -> list[str]:
    """Check an adapter folder on its own (no model): its config is one sekft loads and its
    tensors are LoRA pairs of the config's rank. Raises AdapterError if not; returns why vLLM
    would refuse it (`vllm_warnings`)."""
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    tensors = read_adapter_tensors(adapter_dir)
    path = adapter_weights_path(adapter_dir)
    if not tensors:
        raise AdapterError(f"{path}: holds no tensors")
    for key, tensor in tensors.items():
        part = key.split(".")[-2] if key.endswith(".weight") else None
        if part not in ("lora_A", "lora_B") or tensor.dim() != 2:
            raise AdapterError(f"{path}: tensor {PEFT_PREFIX}{key} is not a LoRA A or B matrix")
        rank = tensor.shape[0] if part == "lora_A" else tensor.shape[1]
        module = key.rsplit(".", 2)[0]
        r = layer_settings(config, [module])[module][0]
        if rank != r:
            raise AdapterError(
                f"{path}: rank mismatch: {ADAPTER_CONFIG} says r={r} for {module} but tensor "
                f"{PEFT_PREFIX}{key} has rank {rank}"
            )
    return vllm_warnings(config, max_lora_rank)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sekft.lora", description="Check a LoRA adapter, or merge it into its base."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="check an adapter folder, say if vLLM would load it")
    check.add_argument("adapter", help=f"folder with {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    check.add_argument("--max-lora-rank", type=int, default=VLLM_MAX_LORA_RANK,
                       help="the vLLM server's --max-lora-rank (default %(default)s)")
    merge = commands.add_parser("merge", help="write base + adapter as one float checkpoint")
    merge.add_argument("--base", required=True, help="checkpoint folder or org/name in HF cache")
    merge.add_argument("--adapter", required=True, help="adapter folder")
    merge.add_argument("--out", required=True, help="output checkpoint folder")
    merge.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                       help="dtype of the written weights (default: the dtype the base's "
                       "safetensors store)")
    args = parser.parse_args(argv)
    if args.command == "check":
        config = read_adapter_config(Path(args.adapter))
        found = check_adapter(args.adapter, args.max_lora_rank)
        targets = config["target_modules"]  # a list, or one regex
        shown = targets if isinstance(targets, str) else sorted(targets)
        print(f"{args.adapter}: LoRA r={config['r']} alpha={config['lora_alpha']} "
              f"targets={shown}: sekft loads it")
        for message in found:
            print(f"vLLM would refuse it: {message}")
        return 0
    # Imported here: the loader is only needed to merge, and lora sits below it otherwise.
    from sekft.base import load_base
    from sekft.checkpoint import resolve_base, stored_dtype, tensor_index

    folder = resolve_base(args.base)
    # By default the dtype the tensors are stored in (config.json's torch_dtype can be stale
    # after a conversion): a float32 base written as bf16 moved the logits by 3-8e-2.
    dtype = getattr(torch, args.dtype) if args.dtype else stored_dtype(tensor_index(folder))
    # Read in the output dtype (a 7B base in float32 would need 28 GB, in bf16 half that);
    # the update itself is computed in float32 and rounded once.
    base = load_base(folder, dtype=dtype, device="cpu")
    load_adapter(base.model, args.adapter)
    out = export_merged(base.model, args.out, base.path, dtype)
    print(f"{out}: merged {args.adapter} into {base.path} ({str(dtype).removeprefix('torch.')})")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli("sekft.lora", main))

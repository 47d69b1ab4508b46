"""Our decoder for Llama, Mistral and Qwen2/Qwen3 checkpoints, in plain PyTorch.

Read top to bottom: the config, the math as pure functions (`rms_norm`, `rope_frequencies`,
`apply_rope`, `attention_mask`), the KV cache, then the modules. Module and parameter names
equal the Hugging Face checkpoint's tensor names (`model.layers.0.self_attn.q_proj.weight`),
so loading is a name-to-name copy and LoRA adapters keep Hugging Face names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from sekft.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")

# SDPA's own grouped-query attention (torch 2.5+) reads each key/value head for its group
# of query heads; without it k/v are repeated, and their backward is a sum over the copies.
_SDPA_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


@dataclass(frozen=True)
class ModelConfig:
    """The architecture, normalised from a Hugging Face `config.json`.

    `sliding_windows[i]` is layer i's attention window (a query sees itself and the
    `window - 1` tokens before it) or None for full causal attention.
    `rope_scaling` is None or a dict with `rope_type` ("linear", "llama3" or "yarn") and its
    fields, yarn's with transformers' defaults filled in (see `_yarn_scaling`).
    `qkv_bias`, `o_bias` and `mlp_bias` say which linears have a bias (see `_biases`).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    tie_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_windows: tuple[int | None, ...]
    max_position_embeddings: int

    @classmethod
    def from_hf(cls, config: dict, source: str = "config.json") -> ModelConfig:
        """Read a Hugging Face config dict (transformers 4 or 5 layout).

        `source` names the file in ConfigError messages.
        """

        def field(key: str, kind: type = int, default=None):
            value = config.get(key)
            if value is None:
                if default is not None:
                    return default
                raise ConfigError(f"{source}: missing required key {key!r}")
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
                raise ConfigError(f"{source}: {key!r} must be {kind.__name__}, got {value!r}")
            return value

        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act {act!r} is not supported; supported: silu")
        quantized = config.get("quantization_config")
        if quantized:
            # Pre-quantized weights (bnb-4bit, AWQ, GPTQ, FP8 exports) are packed integers whose
            # shapes no float layer has; without this the first shape check blamed the config.
            method = quantized.get("quant_method") if isinstance(quantized, dict) else None
            raise ConfigError(
                f"{source}: quantization_config (quant_method {method!r}) is not supported; "
                "sekft reads floating-point weights: use the unquantized checkpoint "
                "(load_4bit quantizes it to NF4 as it loads)"
            )
        hidden = field("hidden_size")
        heads = field("num_attention_heads")
        kv_heads = field("num_key_value_heads", default=heads)
        if heads % kv_heads:
            raise ConfigError(
                f"{source}: num_attention_heads {heads} is not a multiple of "
                f"num_key_value_heads {kv_heads}"
            )
        # Without a head_dim, transformers' Qwen3 takes 128, the others hidden / heads.
        head_dim = config.get("head_dim") or (128 if model_type == "qwen3" else hidden // heads)
        layers = field("num_hidden_layers")
        max_positions = field("max_position_embeddings", default=4096)
        rope_theta, rope_scaling = _rope_config(config, source, max_positions)
        is_qwen = model_type in ("qwen2", "qwen3")
        qkv_bias, o_bias, mlp_bias = _biases(config, model_type)
        return cls(
            model_type=model_type,
            vocab_size=field("vocab_size"),
            hidden_size=hidden,
            intermediate_size=field("intermediate_size"),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=field("rms_norm_eps", float),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            qk_norm=model_type == "qwen3",
            sliding_windows=_sliding_windows(config, model_type, layers, is_qwen),
            max_position_embeddings=max_positions,
        )


def _biases(config: dict, model_type: str) -> tuple[bool, bool, bool]:
    """(q/k/v, o_proj, MLP) biases, as transformers builds each architecture.

    Llama's `attention_bias` gives all four attention projections a bias, and Qwen3's too;
    Qwen2 always has q/k/v biases and no o_proj bias, whatever its config says; Mistral has
    none. Only Llama reads `mlp_bias`.
    """
    attention = bool(config.get("attention_bias", False))
    if model_type == "qwen2":
        return True, False, False
    if model_type == "mistral":
        return False, False, False
    mlp = model_type == "llama" and bool(config.get("mlp_bias", False))
    return attention, attention, mlp


def _rope_config(config: dict, source: str, max_positions: int) -> tuple[float, dict | None]:
    """(theta, scaling) from `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling`.

    `max_positions` (max_position_embeddings) stands in for a yarn scaling's missing
    `original_max_position_embeddings`, as transformers does.
    """
    params = config.get("rope_parameters") or {}
    if "full_attention" in params:
        raise ConfigError(f"{source}: per-layer rope_parameters are not supported")
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    scaling = dict(config.get("rope_scaling") or params)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"{source}: rope type {rope_type!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return theta, None
    if rope_type == "yarn":
        return theta, _yarn_scaling(scaling, source, max_positions)
    needed = ["factor"] + (
        ["low_freq_factor", "high_freq_factor", "original_max_position_embeddings"]
        if rope_type == "llama3"
        else []
    )
    for key in needed:
        if key not in scaling:
            raise ConfigError(f"{source}: rope scaling of type {rope_type!r} lacks {key!r}")
    return theta, {"rope_type": rope_type, **{key: scaling[key] for key in needed}}


def _yarn_scaling(scaling: dict, source: str, max_positions: int) -> dict:
    """A yarn `rope_scaling` with transformers' defaults filled in and its cos/sin scale.

    Keys as transformers reads them: `factor` (required), `original_max_position_embeddings`
    (default max_position_embeddings), `beta_fast` 32 and `beta_slow` 1 (also when 0 or
    null), `truncate` True, and `attention_factor`: given, else
    mscale(factor, mscale) / mscale(factor, mscale_all_dim) when both are set and non-zero,
    else mscale(factor), where mscale(s, m) = 0.1 m ln(s) + 1 (1 for s <= 1).
    """
    if scaling.get("factor") is None:
        raise ConfigError(f"{source}: rope scaling of type 'yarn' lacks 'factor'")
    if "attn_factor" in scaling:
        # vLLM multiplies its cos/sin scale by `attn_factor`; transformers ignores the key, so
        # the two would run different models (DeepSeek-R1-0528-Qwen3-8B ships one).
        raise ConfigError(
            f"{source}: rope scaling 'attn_factor' is not supported (vLLM applies it, "
            "transformers ignores it); give the cos/sin scale as 'attention_factor' instead"
        )
    factor = float(scaling["factor"])

    def mscale(m: float = 1.0) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    attention = scaling.get("attention_factor")
    if attention is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention = mscale(m) / mscale(m_all) if m and m_all else mscale()
    return {
        "rope_type": "yarn",
        "factor": factor,
        "original_max_position_embeddings": scaling.get(
            "original_max_position_embeddings", max_positions
        ),
        "beta_fast": scaling.get("beta_fast") or 32,
        "beta_slow": scaling.get("beta_slow") or 1,
        "truncate": scaling.get("truncate", True),
        "attention_factor": float(attention),
    }


def _sliding_windows(
    config: dict, model_type: str, layers: int, is_qwen: bool
) -> tuple[int | None, ...]:
    if model_type == "mistral":
        # A missing key is transformers' default window, 4096; null means full attention.
        return (config.get("sliding_window", 4096),) * layers
    window = config.get("sliding_window")
    if is_qwen and config.get("use_sliding_window") and window:
        # Qwen applies the window from layer `max_window_layers` on (default 28), as
        # transformers does.
        types = config.get("layer_types") or [
            "sliding_attention"
            if i >= config.get("max_window_layers", 28)
            else "full_attention"
            for i in range(layers)
        ]
        return tuple(window if t == "sliding_attention" else None for t in types)
    return (None,) * layers


# ---- math -------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Root-mean-square norm over the last dim, computed in float32, as Llama does.

    x: [..., H], weight: [H] -> [..., H] in x's dtype (then scaled by weight).
    """
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _RMSNorm.apply(x, weight, eps)
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


class _RMSNorm(torch.autograd.Function):
    """`rms_norm` keeping only x (in its own dtype) and 1/rms per row for the backward pass.

    Autograd would keep x's float32 copy: in bf16 that is twice x, 2 bytes per element per
    norm more (about 35 MB per 512-token row of a 135M model, two norms per block); the
    normalised x is recomputed from x and 1/rms instead, one elementwise pass.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.float() * rstd
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            # d/dx of x * rstd(x): rstd * (g - xhat * mean(g * xhat)), g the gradient at xhat.
            g = (grad * weight).to(x.dtype).float()
            grad_x = (rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))).to(x.dtype)
        if ctx.needs_input_grad[1]:
            normed = xhat.to(x.dtype)
            grad_weight = (grad * normed).reshape(-1, weight.shape[-1]).sum(0).to(weight.dtype)
        return grad_x, grad_weight, None


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up, keeping only `gate` and `up` for the backward pass.

    Autograd would also keep silu(gate), a third [T, intermediate] tensor per block (about
    90 MB per 512-token row of a 135M model); recomputing it costs one elementwise pass.
    """

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        return grad_gate, grad * F.silu(gate)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's gating: silu(gate) * up, elementwise; gate and up [..., I] -> [..., I]."""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _SwiGLU.apply(gate, up)
    return F.silu(gate) * up


def rope_frequencies(
    head_dim: int, theta: float, scaling: dict | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """RoPE inverse frequencies, float32 [head_dim // 2].

    inv_freq[i] = theta ** (-2i / head_dim); `linear` scaling divides them all by `factor`;
    `llama3` divides the low frequencies (wavelength > original_len / low_freq_factor) by
    `factor`, keeps the high ones (wavelength < original_len / high_freq_factor), and
    interpolates smoothly in between; `yarn` ramps linearly, over the dims that turn between
    beta_fast and beta_slow times in original_len positions, from kept (fast dims) to divided
    by `factor` (slow dims). (Yarn also scales cos and sin: `rope_attention_factor`.)
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    if scaling["rope_type"] == "yarn":
        return _yarn_frequencies(inv_freq, head_dim, theta, scaling)
    old_len = scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def _yarn_frequencies(
    inv_freq: torch.Tensor, head_dim: int, theta: float, scaling: dict
) -> torch.Tensor:
    """Yarn's blend of `inv_freq` [head_dim // 2] and inv_freq / factor, as transformers."""
    old_len = scaling["original_max_position_embeddings"]

    def dim_of(rotations: float) -> float:
        # The dim whose frequency turns `rotations` times over the original context.
        return head_dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(scaling["beta_fast"]), dim_of(scaling["beta_slow"])
    if scaling["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    dims = torch.arange(head_dim // 2, dtype=torch.float32, device=inv_freq.device)
    kept = 1 - ((dims - low) / (high - low)).clamp(0, 1)
    return inv_freq / scaling["factor"] * (1 - kept) + inv_freq * kept


def rope_attention_factor(scaling: dict | None) -> float:
    """The factor cos and sin are multiplied by: yarn's `attention_factor`, else 1."""
    return scaling.get("attention_factor", 1.0) if scaling else 1.0


def rope_cos_sin(
    inv_freq: torch.Tensor, position_ids: torch.Tensor, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for `position_ids` [B, T]: each float32 [B, T, head_dim], times
    `scale` (`rope_attention_factor`).

    The two halves of the head dim share frequencies (the "rotate half" layout of HF
    checkpoints, not interleaved pairs).
    """
    angles = position_ids.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    if scale == 1.0:
        return angles.cos(), angles.sin()
    return angles.cos() * scale, angles.sin() * scale


def sdpa_broadcasts_heads(q: torch.Tensor, masked: bool) -> bool:
    """Whether SDPA should broadcast key/value heads over query heads (`enable_gqa`) instead
    of the caller repeating them, for queries like `q` with or without an attention mask.

    Yes on CPU (torch >= 2.5), whose kernels take it. On CUDA only where the flash kernel
    runs (no mask, fp16/bf16, sm80+): the memory-efficient kernel rejects `enable_gqa`, and
    SDPA would fall back to the math kernel, which keeps every [T, S] score matrix.
    """
    if not _SDPA_GQA:
        return False
    if q.device.type != "cuda":
        return True
    flash_dtype = q.dtype in (torch.float16, torch.bfloat16)
    return not masked and flash_dtype and torch.cuda.get_device_capability(q.device) >= (8, 0)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, heads, T, D] by position: x * cos + rotate_half(x) * sin; cos/sin [B, T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def attention_mask(
    q_index: torch.Tensor,
    k_index: torch.Tensor,
    q_doc: torch.Tensor | None = None,
    k_doc: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Boolean mask [B or 1, 1, T, S], True where query t may attend key s.

    q_index [T] and k_index [S] are places in the sequence (cache slots, not position ids).
    A query sees keys at or before it; with `window`, only the `window` most recent ones
    (itself included: q - k < window, as transformers' Mistral); with document ids
    q_doc [B, T] / k_doc [B, S], only keys of its own document.
    """
    distance = q_index[:, None] - k_index[None, :]
    allowed = distance >= 0
    if window is not None:
        allowed = allowed & (distance < window)
    allowed = allowed[None, None]
    if q_doc is not None:
        allowed = allowed & (q_doc[:, None, :, None] == k_doc[:, None, None, :])
    return allowed


def positions_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position ids [B, T] restarting at 0 wherever the document id changes along a row."""
    T = doc_ids.shape[1]
    index = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_index = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - start_index


# ---- cache ------------------------------------------------------------------------------


class KVCache:
    """Keys and values of every layer for the tokens seen so far, for generation.

    Each layer's keys and values live in a buffer with room to spare, doubled when full, so
    a decoding step writes its one new slot instead of copying the whole cache (at 1k
    tokens the copies cost as much memory traffic as a fifth of a 135M model's weights).
    `keys[layer]` and `values[layer]` are views of the filled part, [B, kv_heads, T, D].
    When a forward with a cache gets `doc_ids`, every forward on that cache must: the
    cache keeps the keys' document ids so a left-padded batch can give padding its own id.
    """

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self._buffers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        self.doc_ids: torch.Tensor | None = None

    @property
    def length(self) -> int:
        """How many tokens the cache holds."""
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's k, v [B, kv_heads, T, D] for `layer`; return all of them."""
        old = 0 if self.keys[layer] is None else self.keys[layer].shape[2]
        new = old + k.shape[2]
        buffers = self._buffers[layer]
        if buffers is None or buffers[0].shape[2] < new:
            room = max(new, 2 * old, 64)
            grown = tuple(x.new_empty(x.shape[:2] + (room,) + x.shape[3:]) for x in (k, v))
            if old:
                grown[0][:, :, :old] = self.keys[layer]
                grown[1][:, :, :old] = self.values[layer]
            self._buffers[layer] = buffers = grown
        buffers[0][:, :, old:new] = k
        buffers[1][:, :, old:new] = v
        self.keys[layer], self.values[layer] = buffers[0][:, :, :new], buffers[1][:, :, :new]
        return self.keys[layer], self.values[layer]


# ---- modules ----------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


@dataclass
class _Step:
    """What every block of one forward shares: rope tables, masks, the cache.

    `segments`, when set, are the [start, end) spans of a one-row packed batch's documents:
    attention then runs causally on each span alone instead of under a document mask.
    `rows`, when set, are one cache per batch row (one new token each, `decode_hidden`).
    """

    cos: torch.Tensor
    sin: torch.Tensor
    masks: dict[int | None, torch.Tensor | None]
    is_causal: bool
    cache: KVCache | None
    segments: list[tuple[int, int]] | None = None
    rows: list[KVCache] | None = None


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        c = config
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.window = c.sliding_windows[layer]
        bias = c.qkv_bias
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=bias)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=c.o_bias)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.qk_norm = c.qk_norm

    def forward(self, x: torch.Tensor, step: _Step) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), step.cos, step.sin)
        k = apply_rope(k.transpose(1, 2), step.cos, step.sin)
        if step.rows is not None:
            return self.o_proj(self._rows(q, k, v, step.rows).reshape(B, T, -1))
        if step.cache is not None:
            k, v = step.cache.update(self.layer, k, v)
        group = self.num_heads // self.num_kv_heads
        gqa = {}
        masked = step.segments is None and step.masks[self.window] is not None
        if group > 1 and sdpa_broadcasts_heads(q, masked):
            gqa["enable_gqa"] = True
        elif group > 1:
            # Grouped-query attention: each key/value head serves `group` query heads.
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        if step.segments is not None:
            # Each document alone, causally: the CPU kernel computes every block of a masked
            # [T, T] score matrix, most of which the document mask throws away. Split, not
            # sliced: each slice's backward writes a zero tensor of the whole row and adds it
            # up (a fill and an add per document, 15% of a bf16 step), split's is one concat.
            sizes = [b - a for a, b in step.segments]
            pieces = zip(q.split(sizes, 2), k.split(sizes, 2), v.split(sizes, 2), strict=True)
            parts = [
                F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, **gqa)
                for qd, kd, vd in pieces
            ]
            out = torch.cat(parts, dim=2)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=step.masks[self.window], is_causal=step.is_causal, **gqa
            )
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def _rows(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              caches: list[KVCache]) -> torch.Tensor:
        """Attention of row i's one new token over row i's own cache: [B, 1, heads * D]."""
        gqa = {"enable_gqa": True} if sdpa_broadcasts_heads(q, False) else {}
        group = self.num_heads // self.num_kv_heads
        out = []
        for i, cache in enumerate(caches):
            keys, values = cache.update(self.layer, k[i : i + 1], v[i : i + 1])
            if self.window is not None:
                # One query sees itself and the window - 1 keys before it.
                keys, values = keys[:, :, -self.window :], values[:, :, -self.window :]
            if group > 1 and not gqa:
                keys = keys.repeat_interleave(group, dim=1)
                values = values.repeat_interleave(group, dim=1)
            out.append(F.scaled_dot_product_attention(q[i : i + 1], keys, values, **gqa))
        return torch.cat(out).transpose(1, 2)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU: down(silu(gate(x)) * up(x))."""
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, step: _Step) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), step)
        return x + self.mlp(self.post_attention_layernorm(x))


class Body(nn.Module):
    """The `model.` prefix of checkpoint names: embeddings, blocks, final norm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        # Left uninitialised: weights come from a checkpoint, and nn.Embedding's own init
        # (normal_) costs seconds on first use on the meta device the loader builds on.
        shape = (config.vocab_size, config.hidden_size)
        self.embed_tokens = nn.Embedding(*shape, _weight=torch.empty(shape))
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Decoder(nn.Module):
    """A causal LM: `forward(input_ids) -> logits`, with packing, a KV cache and grad_ckpt.

    `grad_ckpt = True` recomputes each block's activations in the backward pass instead of
    keeping them (torch.utils.checkpoint per block) when training with grad enabled.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Body(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.grad_ckpt = False

    def output_weight(self) -> torch.Tensor:
        """The lm_head weight [V, H] (the embedding matrix itself when tied)."""
        return self.lm_head.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V] for input_ids [B, T]; arguments as in `hidden`."""
        return self.lm_head(self.hidden(input_ids, position_ids, doc_ids, cache))

    def hidden(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Final-normed hidden states [B, T, H] for input_ids [B, T].

        position_ids [B, T]: RoPE positions; by default they continue from the cache
        (0..T-1 without one), restarting at each document when doc_ids are given and
        there is no cache. doc_ids [B, T]: tokens attend only to tokens of the same id
        (packed sequences; padding). cache: extended in place with this step's keys/values.
        """
        B, T = input_ids.shape
        device = input_ids.device
        past = cache.length if cache is not None else 0
        if position_ids is None:
            if doc_ids is not None and past == 0:
                position_ids = positions_from_doc_ids(doc_ids)
            else:
                position_ids = torch.arange(past, past + T, device=device).expand(B, T)
        k_doc = doc_ids
        if cache is not None:
            if (doc_ids is None) != (cache.doc_ids is None) and past > 0:
                raise ValueError("pass doc_ids on every forward of a cache, or on none")
            if doc_ids is not None:
                if cache.doc_ids is not None:
                    k_doc = torch.cat([cache.doc_ids, doc_ids], dim=1)
                cache.doc_ids = k_doc

        x = self.model.embed_tokens(input_ids)
        inv_freq = rope_frequencies(
            self.config.head_dim, self.config.rope_theta, self.config.rope_scaling, device
        )
        scale = rope_attention_factor(self.config.rope_scaling)
        cos, sin = rope_cos_sin(inv_freq, position_ids, scale)
        step = self._step(cos.to(x.dtype), sin.to(x.dtype), past, doc_ids, k_doc, cache)
        checkpointing = self.grad_ckpt and self.training and torch.is_grad_enabled()
        for block in self.model.layers:
            if checkpointing:
                x = checkpoint(block, x, step, use_reentrant=False)
            else:
                x = block(x, step)
        return self.model.norm(x)

    def decode_hidden(self, input_ids: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
        """Final-normed hidden states [B, 1, H] of one new token per row, input_ids [B, 1],
        row i continuing `caches[i]` (caches of any lengths; each is extended in place).

        Decoding one token reads every weight once; on a CPU that memory traffic, not the
        arithmetic, sets the pace, so B conversations stepped together cost little more
        than one. The projections and MLPs run on the batch, attention row by row.
        """
        if input_ids.shape != (len(caches), 1):
            raise ValueError(f"input_ids {tuple(input_ids.shape)}: one token per cache")
        if any(c.doc_ids is not None for c in caches):
            raise ValueError("decode_hidden takes caches built without doc_ids")
        positions = torch.tensor([[c.length] for c in caches], device=input_ids.device)
        x = self.model.embed_tokens(input_ids)
        inv_freq = rope_frequencies(
            self.config.head_dim, self.config.rope_theta, self.config.rope_scaling,
            input_ids.device,
        )
        scale = rope_attention_factor(self.config.rope_scaling)
        cos, sin = rope_cos_sin(inv_freq, positions, scale)
        step = _Step(cos.to(x.dtype), sin.to(x.dtype), {}, False, None, rows=caches)
        for block in self.model.layers:
            x = block(x, step)
        return self.model.norm(x)

    def _step(self, cos, sin, past, q_doc, k_doc, cache) -> _Step:
        T, device = cos.shape[1], cos.device
        S = past + T
        masks: dict[int | None, torch.Tensor | None] = {}
        # The window only bites when some query is `window` or more slots after a key.
        windows = {w if w is not None and w < S else None for w in self.config.sliding_windows}
        plain = q_doc is None and windows == {None}
        if plain and (past == 0 or T == 1):
            # Fast paths: SDPA's own causal kernel, or one new token that sees everything.
            return _Step(cos, sin, dict.fromkeys(self.config.sliding_windows), past == 0, cache)
        segments = _document_segments(q_doc) if cache is None else None
        if segments is not None:
            longest = max(b - a for a, b in segments)
            if all(w is None or w >= longest for w in self.config.sliding_windows):
                # No window bites inside any document: each is its own causal sequence.
                return _Step(cos, sin, {}, False, cache, segments)
        q_index = torch.arange(past, S, device=device)
        k_index = torch.arange(S, device=device)
        for w in set(self.config.sliding_windows):
            window = w if w is not None and w < S else None
            masks[w] = attention_mask(q_index, k_index, q_doc, k_doc, window)
        return _Step(cos, sin, masks, False, cache)


def _document_segments(doc_ids: torch.Tensor | None) -> list[tuple[int, int]] | None:
    """[start, end) spans of the documents of a one-row doc_ids [1, T], or None.

    None unless there is exactly one row and every document is one contiguous run (an id
    that comes back later in the row attends across the gap, which spans cannot express).
    """
    if doc_ids is None or doc_ids.shape[0] != 1:
        return None
    ids = doc_ids[0].tolist()
    starts = [0] + [i for i in range(1, len(ids)) if ids[i] != ids[i - 1]]
    if len({ids[i] for i in starts}) != len(starts):
        return None
    return list(zip(starts, starts[1:] + [len(ids)], strict=True))

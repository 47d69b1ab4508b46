"""NF4 4-bit weights with double quantization, through bitsandbytes (QLoRA's recipe).

Each linear weight of the decoder blocks is quantized as it is read from the checkpoint, so
the full-precision model never exists in memory at once: peak host memory is about the
4-bit model plus the largest single tensor. Embeddings, norms and `lm_head` stay in
floating point. bitsandbytes is imported inside the functions: it takes seconds to import,
and float models never need it.
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import nn

# QLoRA's settings: 64 weights share one absmax, and the absmaxes are themselves quantized
# to 8 bits in blocks of 256 ("double quantization", ~0.37 bits per weight saved).
BLOCKSIZE = 64


def quantize_linear(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    device: torch.device | str,
    compute_dtype: torch.dtype,
) -> nn.Module:
    """A frozen bitsandbytes `Linear4bit` holding `weight` [out, in] as NF4 with double quant.

    The weight is cast to `compute_dtype` and moved to `device` first (bitsandbytes
    dequantizes to the dtype it quantized from, and matmuls in `compute_dtype`); `bias`
    [out] stays unquantized in `compute_dtype`. The caller may drop `weight` afterwards:
    the layer keeps no reference to it.
    """
    import bitsandbytes as bnb

    out_features, in_features = weight.shape
    with torch.device("meta"):
        layer = bnb.nn.Linear4bit(
            in_features,
            out_features,
            bias=bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=True,
            quant_type="nf4",
        )
    source = weight.to(device=device, dtype=compute_dtype)
    layer.weight = bnb.nn.Params4bit(
        source,
        requires_grad=False,
        blocksize=BLOCKSIZE,
        compress_statistics=True,
        quant_type="nf4",
        module=layer,
    ).to(device)
    if bias is not None:
        layer.bias = nn.Parameter(bias.to(device=device, dtype=compute_dtype), requires_grad=False)
    return layer


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None


def release_freed_host_memory() -> None:
    """Give freed heap memory back to the OS, where the C library allows it (glibc).

    Quantizing on CPU makes a few temporaries the size of the tensor; glibc keeps freed
    blocks under 32 MB in its heap, so without this a 4-bit load's peak RSS drifted
    (40-130 MB for a 19 MB result in tests/test_quant.py) instead of staying at the
    4-bit model plus one tensor's work.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def is_4bit(layer: nn.Module) -> bool:
    """True for a bitsandbytes 4-bit linear layer (its weight carries a quant_state)."""
    return getattr(getattr(layer, "weight", None), "quant_state", None) is not None


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The weight [out, in] bitsandbytes' own kernels compute with, in floating point."""
    if not is_4bit(layer):
        return layer.weight.detach()
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)


def model_bytes(model: nn.Module) -> int:
    """Bytes held by a model's tensors, counting 4-bit weights' quantization state, shared
    (tied) tensors once."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            tensors += [
                v for v in state.as_dict(packed=True).values() if isinstance(v, torch.Tensor)
            ]
        for tensor in tensors:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total

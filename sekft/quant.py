"""NF4 4-bit weights with double quantization, through bitsandbytes (QLoRA's recipe).

Each linear weight of the decoder blocks is quantized as it is read from the checkpoint, so
the full-precision model never exists in memory at once: peak host memory is about the
4-bit model plus the largest single tensor. Embeddings, norms and `lm_head` stay in
floating point. bitsandbytes is imported inside the functions: it takes seconds to import,
and float models never need it.

The layer is our own `NF4Linear`, not bitsandbytes' `Linear4bit`, whose forward repacks the
weight in place the first time it runs in eval mode without grad on a CPU with avx512_bf16
(`_convert_weight_packed_for_cpu`: absmax rounded to bf16, double quantization dropped, a
kernel that rounds activations to bf16 and crashes on input sizes not a multiple of 64).
`NF4Linear` keeps the state fixed at load and computes through `bnb.matmul_4bit` (dequantize,
then a dense matmul in the compute dtype), the same on every CPU kind and on CUDA. Measured on
a Zen 5 CPU with avx512_bf16, the packed kernel was faster only for one row at a time (decode:
0.02 ms against 0.13 ms for a 576 x 1536 layer) and slower on training shapes (1.4 ms against
1.1 ms for 512 rows in bf16); keeping it would mean a second copy of every weight.
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
    """A frozen `NF4Linear` holding `weight` [out, in] as NF4 with double quantization.

    The weight is cast to `compute_dtype` and moved to `device` first (bitsandbytes
    dequantizes to the dtype it quantized from, and matmuls in `compute_dtype`); `bias`
    [out] stays unquantized in `compute_dtype`. The caller may drop `weight` afterwards:
    the layer keeps no reference to it.
    """
    import bitsandbytes as bnb

    source = weight.to(device=device, dtype=compute_dtype)
    packed = bnb.nn.Params4bit(
        source,
        requires_grad=False,
        blocksize=BLOCKSIZE,
        compress_statistics=True,
        quant_type="nf4",
    ).to(device)
    if bias is not None:
        bias = nn.Parameter(bias.to(device=device, dtype=compute_dtype), requires_grad=False)
    return NF4Linear(packed, bias, compute_dtype)


class NF4Linear(nn.Linear):
    """A frozen linear layer whose weight is a bitsandbytes `Params4bit` (NF4, its quant_state
    fixed at load), computed by dequantizing it and multiplying in `compute_dtype`.

    x [..., in] -> [..., out] in x's dtype. Any input size works (no kernel restricted to
    multiples of 64 is used), float32 compute stays float32, and the weight and its state
    are never rewritten, so `dequantized_weight`, merges, exports and checksums read the
    weights as loaded, however many forwards ran. The backward pass dequantizes again
    instead of keeping the float weight (bitsandbytes' `MatMul4Bit`).
    """

    def __init__(
        self, weight: nn.Parameter, bias: nn.Parameter | None, compute_dtype: torch.dtype
    ) -> None:
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.quant_state.shape
        self.weight = weight
        self.bias = bias
        self.compute_dtype = compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import bitsandbytes as bnb

        out = bnb.matmul_4bit(
            x.to(self.compute_dtype), self.weight, self.weight.quant_state, bias=self.bias
        )
        return out.to(x.dtype)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        # As Linear4bit saves: the packed weight and bias, then the quant_state's tensors.
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, value in self.weight.quant_state.as_dict(packed=True).items():
            destination[prefix + "weight." + key] = value if keep_vars else value.detach()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, nf4, compute_dtype={self.compute_dtype}"
        )


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
    """True for a 4-bit linear layer (its weight carries a bitsandbytes quant_state)."""
    return getattr(getattr(layer, "weight", None), "quant_state", None) is not None


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The weight [out, in] a 4-bit layer computes with, in floating point (the dtype it was
    quantized from); a float layer's own weight."""
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

"""The training loss: next-token cross-entropy on trained positions only, in chunks.

A shell trajectory trains on 10-25% of its tokens (the commands), so running the `lm_head`
on every position wastes most of its work, and a full [B, T, V] logits tensor (V up to
150k) is the largest activation of the whole model. Here the trained positions are picked
out first, the `lm_head` runs on them a chunk at a time, and the gradient with respect to
the hidden states is computed in the same pass, so no chunk's logits outlive the loop.

Returns a sum and a count rather than a mean: the trainer divides by the number of trained
tokens in the whole optimizer step, so every trained token weighs the same however the
sessions were packed into rows.
"""

from __future__ import annotations

import torch

IGNORE = -100


def _chunked_loss_and_grads(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int,
    want_h: bool,
    want_w: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(sum of CE(h @ weight.T, targets), d sum / d h or None, d sum / d weight or None).

    h [N, H], weight [V, H], targets [N]; the gradients are [N, H] in h's dtype and
    [V, H] in float32. At most one [chunk_size, V] float32 logits block exists at a time.
    """
    w = weight.to(h.dtype)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h) if want_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if want_w else None
    for start in range(0, h.shape[0], chunk_size):
        hc = h[start : start + chunk_size]
        yc = targets[start : start + chunk_size]
        # Softmax statistics in float32 whatever the compute dtype, as transformers upcasts
        # logits before its loss.
        logits = (hc @ w.T).float()
        lse = torch.logsumexp(logits, dim=-1)
        total += (lse - logits.gather(1, yc[:, None]).squeeze(1)).sum()
        if not (want_h or want_w):
            continue
        # d CE / d logits = softmax - onehot, computed in place over the logits block.
        dlogits = logits.sub_(lse[:, None]).exp_()
        dlogits[torch.arange(len(yc), device=h.device), yc] -= 1.0
        if grad_h is not None:
            grad_h[start : start + chunk_size] = dlogits.to(h.dtype) @ w
        if grad_w is not None:
            grad_w += dlogits.T @ hc.float()
    return total, grad_h, grad_w


class _LinearCrossEntropySum(torch.autograd.Function):
    """Autograd wrapper of `_chunked_loss_and_grads`.

    The loss is a scalar sum, so its gradients are known during the forward up to the
    incoming scalar; keeping them ([N, H], and [V, H] only if the weight trains) is far
    smaller than keeping every chunk's [C, V] softmax for the backward.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_size, want_h, want_w):
        total, grad_h, grad_w = _chunked_loss_and_grads(
            h, weight, targets, chunk_size, want_h, want_w
        )
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        # In float32, then back: rounding the scale (1 / trained tokens) to bf16 first would
        # scale the whole gradient by up to 0.4% off.
        dh = (grad_h.float() * grad_out).to(grad_h.dtype) if grad_h is not None else None
        dw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None, None, None


def linear_cross_entropy_sum(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 512
) -> torch.Tensor:
    """Summed cross-entropy of logits `h @ weight.T` against `targets`, never all at once.

    h [N, H], weight [V, H], targets [N] int64 in 0..V-1 -> a float32 scalar equal to
    `F.cross_entropy(h @ weight.T, targets, reduction="sum")`, differentiable in h and weight;
    at most [chunk_size, V] logits exist at any moment.
    """
    grads = torch.is_grad_enabled()
    want_h = grads and h.requires_grad
    want_w = grads and weight.requires_grad
    if not (want_h or want_w):
        return _chunked_loss_and_grads(h, weight, targets, chunk_size, False, False)[0]
    return _LinearCrossEntropySum.apply(h, weight, targets, chunk_size, want_h, want_w)


def trained_token_loss(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int = 512
) -> tuple[torch.Tensor, int]:
    """Next-token loss summed over trained positions, and how many there are.

    hidden [B, T, H]: final-normed hidden states; weight [V, H]: the lm_head weight;
    labels [B, T] int64, unshifted, IGNORE (-100) where nothing trains. As in transformers,
    position t predicts labels[t + 1]. Returns (float32 scalar sum, count); sum / count is
    transformers' mean causal-LM loss on the same labels.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE
    h = hidden[:, :-1][keep]
    y = targets[keep]
    return linear_cross_entropy_sum(h, weight, y, chunk_size), int(y.numel())

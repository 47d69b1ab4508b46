"""The chunked trained-positions loss against torch's own cross-entropy on full logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sekft.loss import IGNORE, linear_cross_entropy_sum, trained_token_loss


def _case(seed: int = 0, B: int = 2, T: int = 9, H: int = 8, V: int = 13):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.5] = IGNORE
    return hidden, weight, labels


def _reference(hidden, weight, labels):
    """transformers' causal-LM loss recipe, as a sum: full logits, shift, ignore -100."""
    logits = hidden @ weight.T
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, weight.shape[0]),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )


def test_trained_token_loss_equals_full_logits_cross_entropy_sum():
    hidden, weight, labels = _case()
    loss, n = trained_token_loss(hidden, weight, labels, chunk_size=3)
    assert n == int((labels[:, 1:] != IGNORE).sum())
    torch.testing.assert_close(loss, _reference(hidden, weight, labels), rtol=1e-6, atol=1e-5)


def test_trained_token_loss_gradients_equal_full_logits_gradients():
    hidden, weight, labels = _case(seed=1)
    loss, _ = trained_token_loss(hidden, weight, labels, chunk_size=4)
    (loss * 0.37).backward()
    ours = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    (_reference(hidden, weight, labels) * 0.37).backward()
    torch.testing.assert_close(ours[0], hidden.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[1], weight.grad, rtol=1e-5, atol=1e-6)


def test_trained_token_loss_does_not_depend_on_chunk_size():
    hidden, weight, labels = _case(seed=2, T=40)
    losses = [trained_token_loss(hidden, weight, labels, chunk_size=c)[0] for c in (1, 7, 1000)]
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(losses[0], losses[2])


def test_trained_token_loss_gives_no_gradient_to_a_frozen_weight():
    hidden, weight, labels = _case(seed=3)
    weight = weight.detach()
    loss, _ = trained_token_loss(hidden, weight, labels)
    loss.backward()
    assert weight.grad is None
    assert hidden.grad is not None


def test_untrained_positions_get_zero_gradient():
    hidden, weight, labels = _case(seed=4)
    loss, _ = trained_token_loss(hidden, weight, labels)
    loss.backward()
    predicts_nothing = torch.cat(
        [labels[:, 1:] == IGNORE, torch.ones(labels.shape[0], 1, dtype=torch.bool)], dim=1
    )
    assert hidden.grad[predicts_nothing].abs().max() == 0
    assert hidden.grad[~predicts_nothing].abs().min() > 0


def test_linear_cross_entropy_sum_without_grad_returns_the_same_value():
    hidden, weight, labels = _case(seed=5)
    h = hidden[0].detach()
    y = labels[0].clamp(min=0)
    with torch.no_grad():
        value = linear_cross_entropy_sum(h, weight, y, chunk_size=2)
    expected = F.cross_entropy(h @ weight.detach().T, y, reduction="sum")
    torch.testing.assert_close(value, expected)

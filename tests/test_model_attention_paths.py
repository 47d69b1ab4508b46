"""The decoder's faster attention paths give the same results as the document mask."""

from __future__ import annotations

import pytest
import torch

import sekft.model
from sekft.base import load_base
from sekft.model import _document_segments

TOL = 1e-5


def test_document_segments_are_the_runs_of_one_row():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2]])
    assert _document_segments(doc_ids) == [(0, 3), (3, 5), (5, 6)]


def test_document_segments_refuse_an_id_that_comes_back():
    assert _document_segments(torch.tensor([[0, 0, 1, 1, 0]])) is None


def test_document_segments_refuse_several_rows():
    assert _document_segments(torch.tensor([[0, 1], [0, 1]])) is None


def _trainable(path):
    model = load_base(path, device="cpu").model
    model.requires_grad_(True)
    return model


def _loss_and_grads(model, ids, doc_ids):
    model.zero_grad(set_to_none=True)
    logits = model(ids, doc_ids=doc_ids)
    logits.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_per_document_attention_matches_the_document_mask_with_gradients(
    fixture, request, monkeypatch
):
    model = _trainable(request.getfixturevalue(fixture))
    lengths = [5, 9, 1, 7]
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, sum(lengths)), generator=generator)
    doc_ids = torch.tensor([[d for d, n in enumerate(lengths) for _ in range(n)]])
    segmented, segmented_grads = _loss_and_grads(model, ids, doc_ids)
    monkeypatch.setattr(sekft.model, "_document_segments", lambda doc_ids: None)
    masked, masked_grads = _loss_and_grads(model, ids, doc_ids)
    torch.testing.assert_close(segmented, masked, atol=TOL, rtol=0)
    assert segmented_grads.keys() == masked_grads.keys() and masked_grads
    for name, grad in masked_grads.items():
        torch.testing.assert_close(segmented_grads[name], grad, atol=TOL, rtol=1e-4, msg=name)


def test_repeat_interleaved_gqa_matches_sdpa_gqa(tiny_llama, monkeypatch):
    model = _trainable(tiny_llama)
    assert model.config.num_heads > model.config.num_kv_heads
    ids = torch.randint(
        0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1)
    )
    fast, fast_grads = _loss_and_grads(model, ids, None)
    monkeypatch.setattr(sekft.model, "_SDPA_GQA", False)
    slow, slow_grads = _loss_and_grads(model, ids, None)
    torch.testing.assert_close(fast, slow, atol=TOL, rtol=0)
    for name, grad in slow_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, atol=TOL, rtol=1e-4, msg=name)

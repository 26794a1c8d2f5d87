"""The chunked cross-entropy (engine/tensor_parallel/cross_entropy.py) at tp = 1: bit-identical
to the unchunked fp32 formula it replaced, however the rows are cut, within fp32 rounding of
torch's F.cross_entropy, and it keeps no [tokens, vocab] fp32 tensor for backward. The
vocab-parallel case (tp 2, 4) is tests/engine/tensor_parallel/test_layers.py."""
import pytest
import torch
import torch.nn.functional as F

import engine.tensor_parallel.cross_entropy as ce
from engine.testing.memory_probe import LiveStorageTracker

B, S, VOCAB = 3, 40, 1000


def _unchunked(logits_bsv, labels_bs, ignore_index=-100):
    """The whole-tensor fp32 computation (the engine's before 2026-12-03), at tp = 1."""
    logits = logits_bsv.float()
    shifted = logits - logits.max(dim=-1).values.unsqueeze(-1)
    safe = labels_bs.clamp(0, logits.shape[-1] - 1)
    exp = shifted.exp()
    sum_exp = exp.sum(-1)
    ignored = labels_bs == ignore_index
    loss = (sum_exp.log() - shifted.gather(-1, safe.unsqueeze(-1)).squeeze(-1)).masked_fill(ignored, 0.0)
    softmax = exp / sum_exp.unsqueeze(-1)
    onehot = torch.zeros_like(softmax).scatter_(-1, safe.unsqueeze(-1), (~ignored).unsqueeze(-1).float())
    return loss, softmax, onehot


def _inputs(dtype):
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(B, S, VOCAB, generator=gen)).to(dtype).requires_grad_()
    labels = torch.randint(0, VOCAB, (B, S), generator=gen)
    labels[0, :5] = -100
    scale = torch.rand(B, S, generator=gen)       # a non-uniform upstream gradient
    return logits, labels, scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_elems", [1 << 24, 7 * VOCAB, VOCAB // 3])
def test_bit_identical_to_the_unchunked_formula(monkeypatch, dtype, chunk_elems):
    monkeypatch.setattr(ce, "CPU_ROW_CHUNK_ELEMS", chunk_elems)     # one slice, 7 rows, 1 row
    logits, labels, scale = _inputs(dtype)
    loss = ce.vocab_parallel_cross_entropy(logits, labels, None)
    (loss * scale).sum().backward()
    want_loss, softmax, onehot = _unchunked(logits.detach(), labels)
    want_grad = ((softmax - onehot) * scale.masked_fill(labels == -100, 0.0).unsqueeze(-1)).to(dtype)
    assert torch.equal(loss, want_loss)
    assert torch.equal(logits.grad, want_grad)
    assert (loss[0, :5] == 0).all() and (logits.grad[0, :5] == 0).all()


def test_matches_torch_cross_entropy():
    logits, labels, scale = _inputs(torch.float32)
    loss = ce.vocab_parallel_cross_entropy(logits, labels, None)
    (loss * scale).sum().backward()
    ref_logits = logits.detach().clone().requires_grad_()
    ref = F.cross_entropy(ref_logits.flatten(0, 1), labels.flatten(), reduction="none").view(B, S)
    (ref * scale).sum().backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-5, atol=1e-7)


def test_keeps_the_logits_and_two_floats_per_token(monkeypatch):
    """What the forward leaves for backward, beyond its input: the per-token max and
    sum-exp (fp32), label and masks; nothing [tokens, vocab]-sized."""
    monkeypatch.setattr(ce, "CPU_ROW_CHUNK_ELEMS", 4 * VOCAB)
    logits, labels, _ = _inputs(torch.bfloat16)
    with LiveStorageTracker() as tracker:
        loss = ce.vocab_parallel_cross_entropy(logits, labels, None)
    kept = tracker.live_bytes
    tokens = B * S
    # max, the reduced (sum-exp, target) pair, label, 2 masks, loss: 26 bytes a token,
    # where the unchunked version kept the fp32 softmax, 4 * VOCAB = 4,000
    assert kept <= tokens * (4 + 8 + 8 + 1 + 1 + 4), kept
    assert tracker.peak_bytes < 3 * 4 * 4 * VOCAB + 64 * tokens   # a few fp32 slices of 4 rows
    loss.sum().backward()
    assert logits.grad.dtype == torch.bfloat16

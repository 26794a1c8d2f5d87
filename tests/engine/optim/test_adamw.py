"""The chunked AdamW against torch.optim.AdamW's per-tensor kernel: bit-identical params and
moments for any chunk size (chunks that split a tensor, do not divide it, or exceed it),
with and without weight decay, over several steps."""
import pytest
import torch

from engine.optim.adamw import chunked_adamw_

SIZES = (1, 37, 64, 1000)
HYPER = dict(lr=3e-2, betas=(0.9, 0.95), eps=1e-8)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("chunk_elems", [1, 16, 999, 4096])
def test_bit_identical_to_torch_adamw(chunk_elems, weight_decay):
    gen = torch.Generator().manual_seed(0)
    ref = [torch.randn(n, generator=gen).requires_grad_(True) for n in SIZES]
    ours = [p.detach().clone() for p in ref]
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in ours]
    opt = torch.optim.AdamW(ref, weight_decay=weight_decay, **HYPER)
    for step in range(1, 5):
        grads = [torch.randn(n, generator=gen) for n in SIZES]
        for p, g in zip(ref, grads):
            p.grad = g.clone()
        opt.step()
        chunked_adamw_(ours, grads, [m for m, _ in moments], [v for _, v in moments], step=step,
                       lr=HYPER["lr"], beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=weight_decay,
                       chunk_elems=chunk_elems)
        for p, q, (m, v) in zip(ref, ours, moments):
            assert torch.equal(p.detach(), q), (step, p.numel())
            assert torch.equal(opt.state[p]["exp_avg"], m) and torch.equal(opt.state[p]["exp_avg_sq"], v)


def test_no_tensors_is_a_no_op():
    chunked_adamw_([], [], [], [], step=1, lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)

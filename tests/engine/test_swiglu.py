"""engine/swiglu.py: the same gradients as autograd's silu(g) * u, bit for bit, while
keeping only g and u for backward."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.swiglu import swiglu
from engine.testing.saved import saved_tensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_are_bit_identical_to_autograds(dtype):
    gen = torch.Generator().manual_seed(0)
    gate, up, d_act = (torch.randn(37, 24, generator=gen).to(dtype) for _ in range(3))
    gate.requires_grad_(True)
    up.requires_grad_(True)
    want = torch.autograd.grad(F.silu(gate) * up, (gate, up), d_act)
    got = torch.autograd.grad(swiglu(gate, up), (gate, up), d_act)
    assert torch.equal(swiglu(gate, up), F.silu(gate) * up)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_keeps_only_gate_and_up():
    gate = torch.randn(8, 16, requires_grad=True)
    up = torch.randn(8, 16, requires_grad=True)
    _, kept = saved_tensors(lambda: swiglu(gate * 1, up * 1))
    _, kept_autograd = saved_tensors(lambda: F.silu(gate * 1) * (up * 1))
    assert len(kept) == 2 and len(kept_autograd) == 3     # autograd adds silu(gate)

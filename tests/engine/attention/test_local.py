"""LocalAttention (cp = 1 core): parity with torch SDPA, counters, no forward re-run in backward."""
import pytest
import torch
import torch.nn.functional as F

from engine.attention import LocalAttention

TOL = dict(rtol=1e-5, atol=1e-6)  # fp32, same maths in a different kernel: rounding only


def _sdpa(q, k, v, causal):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=causal, enable_gqa=True).transpose(1, 2)


@pytest.mark.parametrize("backend", ["auto", "cpu", "math"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kv_heads", [4, 1])
def test_local_attention_matches_sdpa(backend, causal, kv_heads):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 10, 4, 16, generator=gen, requires_grad=True)
    k, v = (torch.randn(2, 10, kv_heads, 16, generator=gen, requires_grad=True) for _ in range(2))
    dout = torch.randn(2, 10, 4, 16, generator=gen)
    core = LocalAttention(backend, causal=causal)
    out = core(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref = _sdpa(q, k, v, causal)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    torch.testing.assert_close(out, ref, **TOL)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **TOL)


def test_counters_count_forward_only_and_reset():
    core = LocalAttention("cpu")
    q = torch.randn(1, 6, 2, 8, requires_grad=True)
    core(q, q, q).sum().backward()
    assert core.block_forward_calls == 1   # backward did not re-run the forward
    core(q, q, q)
    assert core.block_forward_calls == 2
    core.reset_counters()
    assert core.block_forward_calls == 0

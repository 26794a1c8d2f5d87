"""Grouped-GEMM experts against a per-expert loop written here (the test reference), and the
unbind fallback against the same loop.

Tolerance: fp32 with a different summation order inside each GEMM; measured ~3e-7 of the
largest value, held at 1e-6 relative to the tensor's largest value. The reference runs in
fp64 so that only the grouped side's rounding is measured.
"""
import pytest
import torch
import torch.nn.functional as F

from engine.moe.experts import GroupedExperts, GroupedMM, grouped_gemm_supported, grouped_swiglu
from engine.testing.saved import saved_tensors

REL = 1e-6


def loop_reference(x_nh, counts, w_gate, w_up, w_down):
    """SwiGLU per expert over contiguous row groups; rows past sum(counts) give zeros."""
    outputs, start = [], 0
    for e, n in enumerate(counts):
        x_ch = x_nh[start:start + n]
        outputs.append((F.silu(x_ch @ w_gate[e]) * (x_ch @ w_up[e])) @ w_down[e])
        start += n
    outputs.append(x_nh.new_zeros(x_nh.shape[0] - start, w_down.shape[-1]))
    return torch.cat(outputs)


def _weights(num_experts, hidden, ffn, gen):
    return [torch.randn(num_experts, hidden, ffn, generator=gen) * 0.3,
            torch.randn(num_experts, hidden, ffn, generator=gen) * 0.3,
            torch.randn(num_experts, ffn, hidden, generator=gen) * 0.3]


def _grads(fn, x, weights, grad_out):
    x = x.clone().requires_grad_(True)
    weights = [w.clone().requires_grad_(True) for w in weights]
    y = fn(x, weights)
    y.backward(grad_out)
    return [y.detach(), x.grad] + [w.grad for w in weights]


def _rel_err(actual, expected):
    if expected.numel() == 0:
        return 0.0 if actual.shape == expected.shape else float("inf")
    scale = max(expected.abs().max().item(), 1e-30)
    return (actual.double() - expected).abs().max().item() / scale


CASES = {   # counts per expert; the last entry (if any) beyond len(counts) is the tail
    "uneven": ([5, 1, 9, 3], 0),
    "empty_experts": ([0, 7, 0, 4], 0),
    "one_token": ([0, 0, 1, 0], 0),
    "all_empty": ([0, 0, 0, 0], 0),
    "dropped_tail": ([2, 0, 3, 1], 4),
}


@pytest.mark.parametrize("hidden,ffn", [(16, 8), (12, 6)], ids=["grouped_gemm", "unbind_fallback"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_loop_reference_outputs_and_grads(case, hidden, ffn):
    counts, tail = CASES[case]
    gen = torch.Generator().manual_seed(0)
    weights = _weights(len(counts), hidden, ffn, gen)
    x = torch.randn(sum(counts) + tail, hidden, generator=gen)
    grad_out = torch.randn(x.shape[0], hidden, generator=gen)
    assert grouped_gemm_supported(x, weights[0]) == (ffn == 8)      # which path this case runs
    counts_e = torch.tensor(counts)
    got = _grads(lambda x, w: grouped_swiglu(x, counts_e, *w, has_tail=tail > 0), x, weights, grad_out)
    want = _grads(lambda x, w: loop_reference(x, counts, *w), x.double(),
                  [w.double() for w in weights], grad_out.double())
    for name, a, b in zip(["out", "x", "w_gate", "w_up", "w_down"], got, want):
        assert _rel_err(a, b) <= REL, (case, name, _rel_err(a, b))
    # Empty experts get an exact zero gradient (every rank reduces the same set of grads);
    # tail rows get exactly zero output and input gradient.
    for e, n in enumerate(counts):
        if n == 0:
            assert all(g[e].abs().sum() == 0 for g in got[2:]), (case, e)
    if tail:
        assert got[0][-tail:].abs().max() == 0 and got[1][-tail:].abs().max() == 0


def test_backward_takes_a_non_contiguous_output_gradient():
    experts = GroupedExperts(3, 16, 8)
    x = torch.randn(6, 16, requires_grad=True)
    experts(x, torch.tensor([2, 0, 4])).sum().backward()   # sum's grad is an expanded view
    assert x.grad.shape == x.shape and experts.w_down.grad[1].abs().max() == 0


def test_bf16_on_cpu_uses_the_grouped_kernel_within_bf16_rounding():
    gen = torch.Generator().manual_seed(1)
    weights = _weights(3, 16, 8, gen)
    x = torch.randn(9, 16, generator=gen)
    counts = [4, 0, 5]
    assert grouped_gemm_supported(x.bfloat16(), weights[0].bfloat16())
    y = grouped_swiglu(x.bfloat16(), torch.tensor(counts), *[w.bfloat16() for w in weights])
    expected = loop_reference(x.double(), counts, *[w.double() for w in weights])
    assert _rel_err(y, expected) < 2e-2      # bf16: 8 significant bits


def test_wrong_number_of_counts_is_a_clear_error():
    with pytest.raises(ValueError, match="counts for 2 experts, weights for 3"):
        GroupedExperts(3, 16, 8)(torch.randn(4, 16), torch.tensor([2, 2]))


def test_grouped_experts_keep_two_ffn_tensors_and_autograds_gradients():
    """Saved for backward: x, gate and up outputs (the product is recomputed); the result
    is bit-identical to composing the GEMMs with autograd's silu and mul."""
    gen = torch.Generator().manual_seed(3)
    counts = torch.tensor([5, 0, 9, 3])
    x = torch.randn(21, 16, generator=gen).requires_grad_(True)
    weights = [w.requires_grad_(True) for w in _weights(4, 16, 8, gen)]
    offs = torch.cumsum(counts, 0, dtype=torch.int32)

    def composed():
        gate = GroupedMM.apply(x, weights[0], offs, True)
        up = GroupedMM.apply(x, weights[1], offs, True)
        return GroupedMM.apply(F.silu(gate) * up, weights[2], offs, True)
    results = []
    for fn in (lambda: grouped_swiglu(x, counts, *weights, has_tail=True), composed):
        y, kept = saved_tensors(fn)
        ffn_rows = [t for t in kept.values() if t.shape == (21, 8)]
        grad_out = torch.randn(21, 16, generator=torch.Generator().manual_seed(4))
        results.append([y.detach(), *torch.autograd.grad(y, [x, *weights], grad_out)])
        results[-1].append(len(ffn_rows))
    assert results[0][-1] == 2 and results[1][-1] == 4
    assert all(torch.equal(a, b) for a, b in zip(results[0][:-1], results[1][:-1]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu_checks.sh runs it)")
def test_a_weight_off_16_byte_alignment_takes_the_loop_on_cuda():
    # Weights are views at any element offset of an optimizer bucket; the CUDA grouped GEMM
    # refuses a base pointer that is not 16-byte aligned, so such operands take the loop.
    flat = torch.zeros(1 + 2 * 16 * 32, dtype=torch.bfloat16, device="cuda")
    misaligned, aligned = flat[1:].view(2, 16, 32), flat[:-1].view(2, 16, 32)
    x = torch.randn(8, 16, dtype=torch.bfloat16, device="cuda")
    assert grouped_gemm_supported(x, aligned) == (torch.cuda.get_device_capability()[0] >= 8)
    assert not grouped_gemm_supported(x, misaligned)
    counts = torch.tensor([3, 5], device="cuda")
    out = grouped_swiglu(x, counts, misaligned, misaligned, misaligned.transpose(1, 2).contiguous())
    assert out.shape == (8, 16)

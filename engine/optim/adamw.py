"""AdamW over the optimizer's flat fp32 ranges, chunk by chunk (Loshchilov & Hutter,
arXiv 1711.05101: decoupled weight decay).

Each element gets exactly the arithmetic of torch's per-tensor AdamW
(`torch.optim.adam._single_tensor_adam` with decoupled decay: the same ops, in the same
order, with the same Python-float scalars), so the result is bit-identical to
torch.optim.AdamW on the separate params: every op is elementwise, so where a range is
cut changes no element's value. What changes is memory traffic: over a whole range (the
expert stacks are 50 MB each) `sqrt` and `/` allocate two fresh range-sized temporaries
(glibc maps blocks over 32 MB afresh, so every step page-faults them in) and each of the
eight ops streams the range through DRAM; on chunks of CHUNK_ELEMS with one reused scratch
buffer, the four operands stay in the last-level cache across the eight ops. torch's
fused and foreach kernels reorder the arithmetic (one ulp away from the per-tensor result),
so they would break the bit-exact parity with torch.optim.AdamW that the tests hold.
"""
from __future__ import annotations

import torch

# 4 operands + 1 scratch of 1M fp32 = 20 MB, inside a 32 MB L3. Chunks of 64K-4M elements all
# took 0.2-0.5x the per-tensor kernel's time on the 2-core CPU, 1M the least in the quieter of
# two runs (benchmarks/results/adamw.json); smaller chunks pay the 8 ops' dispatch more often.
CHUNK_ELEMS = 1 << 20


@torch.no_grad()
def chunked_adamw_(params: list[torch.Tensor], grads: list[torch.Tensor],
                   exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor], *, step: int,
                   lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                   chunk_elems: int = CHUNK_ELEMS) -> None:
    """One AdamW update of 1-D fp32 tensors in place; `step` counts this update (1 first)."""
    # Scalars computed exactly as torch's single-tensor path does (Python floats).
    step_f = float(step)
    bias_correction1 = 1 - beta1 ** step_f
    bias_correction2 = 1 - beta2 ** step_f
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2 ** 0.5
    decay = 1 - lr * weight_decay
    if not params:
        return
    # One reused buffer for the denominator (torch's path allocates it per tensor).
    scratch = torch.empty(min(chunk_elems, max(p.numel() for p in params)),
                          dtype=params[0].dtype, device=params[0].device)
    for param, grad, exp_avg, exp_avg_sq in zip(params, grads, exp_avgs, exp_avg_sqs, strict=True):
        for lo in range(0, param.numel(), chunk_elems):
            hi = min(lo + chunk_elems, param.numel())
            p, g, m, v = param[lo:hi], grad[lo:hi], exp_avg[lo:hi], exp_avg_sq[lo:hi]
            if weight_decay != 0:
                p.mul_(decay)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = torch.sqrt(v, out=scratch[:hi - lo])
            denom.div_(bias_correction2_sqrt).add_(eps)
            p.addcdiv_(m, denom, value=-step_size)

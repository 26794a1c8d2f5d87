"""Per-token cross-entropy over (vocab-sharded) logits, in row chunks: it keeps the logits in
their own dtype and two fp32 numbers per token for backward, never a [tokens, vocab] fp32
tensor.

loss = log(sum_v exp(z_v - m)) - (z_y - m), with m the row max over the whole vocab (an
all-reduce MAX over TP) and the sum-exp and target logit summed over TP (one all-reduce of
both); gradient softmax - onehot(y), restricted to this rank's vocab block (Megatron's
vocab-parallel CE, Shoeybi et al. arXiv 1909.08053). At tp = 1 the same code runs without
the all-reduces.

Why chunks: the fp32 exp / softmax of a 151,936-word vocabulary is 4 bytes per logit, and
the unchunked version held up to three of them at once (the fp32 copy, the shifted logits,
their exp) and kept the softmax for backward; for 4,096 tokens at V/tp = 75,968 that is
1.2 GB each. Here the forward and the backward each run over row slices of at most
`row_chunk_elems(device)` fp32 elements, and backward recomputes the softmax of a slice
from the kept logits with the same ops (exp(z - m) / s), so the loss and the gradient are
bit-identical to the unchunked computation: every op is row-wise, so where the rows are
cut changes no value. Time and memory against the unchunked version and torch's
F.cross_entropy: benchmarks/cross_entropy.py.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .comm import TPComm

# fp32 elements per slice. CPU: 1 MB stays in L2; forward + backward of 4,096 x 32,768 bf16
# logits took 397 / 445 / 485 / 784 ms at 2^18 / 2^20 / 2^22 / 2^24 (2-core CPU, one thread,
# idle machine, 2026-12-03). GPU: 64 MB, so each of a slice's ~9 kernels streams tens of
# microseconds of HBM time, well above its launch (not measured: no GPU was lent).
CPU_ROW_CHUNK_ELEMS = 1 << 18
GPU_ROW_CHUNK_ELEMS = 1 << 24


def row_chunk_elems(device: torch.device) -> int:
    return CPU_ROW_CHUNK_ELEMS if device.type == "cpu" else GPU_ROW_CHUNK_ELEMS


def _row_split(logits_tv: torch.Tensor, *per_row: torch.Tensor):
    """The logits and each per-row tensor cut into the same row slices (views, one split
    each: nothing per slice)."""
    step = max(1, row_chunk_elems(logits_tv.device) // max(logits_tv.shape[1], 1))
    return zip(*(t.split(step) for t in (logits_tv, *per_row)))


def _all_reduce(comm: TPComm | None, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    return tensor if comm is None else comm.all_reduce(tensor, op)


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_bsv, labels_bs, comm, ignore_index):
        num_local = logits_bsv.shape[-1]
        logits_tv = logits_bsv.reshape(-1, num_local)
        labels_t = labels_bs.reshape(-1)
        # The max of the model-dtype values is exact in fp32: no fp32 copy needed for it.
        row_max_t = _all_reduce(comm, logits_tv.amax(dim=-1).float().contiguous(), dist.ReduceOp.MAX)
        local_label_t = labels_t - (comm.rank if comm is not None else 0) * num_local
        in_shard_t = (local_label_t >= 0) & (local_label_t < num_local)
        safe_label_t = local_label_t.clamp(0, num_local - 1)
        target_t = (logits_tv.gather(-1, safe_label_t.unsqueeze(-1)).squeeze(-1).float()
                    - row_max_t) * in_shard_t
        sum_exp_t = torch.empty_like(row_max_t)
        for z_cv, max_c1, sum_exp_c in _row_split(logits_tv, row_max_t.unsqueeze(-1), sum_exp_t):
            torch.sum((z_cv.float() - max_c1).exp_(), -1, out=sum_exp_c)
        sums = _all_reduce(comm, torch.stack((sum_exp_t, target_t)))
        sum_exp_t, target_t = sums[0], sums[1]
        ignored_t = labels_t == ignore_index
        loss_t = (sum_exp_t.log() - target_t).masked_fill(ignored_t, 0.0)
        ctx.save_for_backward(logits_bsv, row_max_t, sum_exp_t, safe_label_t, in_shard_t & ~ignored_t,
                              ignored_t)
        return loss_t.view(labels_bs.shape)

    @staticmethod
    def backward(ctx, grad_loss_bs):
        logits_bsv, row_max_t, sum_exp_t, safe_label_t, hit_t, ignored_t = ctx.saved_tensors
        logits_tv = logits_bsv.reshape(-1, logits_bsv.shape[-1])
        scale_t1 = grad_loss_bs.reshape(-1).float().masked_fill(ignored_t, 0.0).unsqueeze(-1)
        # softmax - onehot(y): adding -1 at the label is the same float op as subtracting 1
        minus_hit_t1, label_t1 = -hit_t.float().unsqueeze(-1), safe_label_t.unsqueeze(-1)
        row_max_t1, sum_exp_t1 = row_max_t.unsqueeze(-1), sum_exp_t.unsqueeze(-1)
        grad_tv = torch.empty_like(logits_tv)
        for z_cv, max_c1, sum_exp_c1, label_c1, minus_hit_c1, scale_c1, grad_cv in _row_split(
                logits_tv, row_max_t1, sum_exp_t1, label_t1, minus_hit_t1, scale_t1, grad_tv):
            softmax = (z_cv.float() - max_c1).exp_().div_(sum_exp_c1)
            softmax.scatter_add_(-1, label_c1, minus_hit_c1)
            torch.mul(softmax, scale_c1, out=grad_cv)   # fp32 product, rounded once on store
        return grad_tv.view_as(logits_bsv), None, None, None


def vocab_parallel_cross_entropy(logits_local_bsv: torch.Tensor, labels_bs: torch.Tensor,
                                 tp_comm: TPComm | None, ignore_index: int = -100) -> torch.Tensor:
    """Per-token CE [b, s] (fp32) from logits sharded by contiguous vocab blocks over TP
    (rank r holds ids [r*V/tp, (r+1)*V/tp)); replicated on the TP ranks. `tp_comm` None:
    the whole vocab is here (tp = 1). Tokens labelled `ignore_index` give 0 loss and 0
    gradient."""
    return _ChunkedCrossEntropy.apply(logits_local_bsv, labels_bs, tp_comm, ignore_index)

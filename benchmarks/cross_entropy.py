"""The LM loss, forward + backward, on one rank's logits: foldmoe's chunked cross-entropy
(engine/tensor_parallel/cross_entropy.py) against the unchunked fp32 one it replaced and
torch's F.cross_entropy on an fp32 copy (what tp = 1 ran before). CPU, one thread.

Time per call (interleaved rounds, medians) and the peak bytes the call allocates beyond
its input (engine/testing/memory_probe.py), for 4,096 tokens of a 32,768-word vocabulary
block (Mixtral at tp = 1; Qwen2's 151,936 at tp = 2 is 75,968), bf16 and fp32 logits.

    python -m benchmarks.cross_entropy [--rounds 5]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.common import interleaved_rounds, median, median_ratio, print_table, rounds_args, write_json
from engine.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from engine.testing.memory_probe import LiveStorageTracker

TOKENS, VOCAB = 4096, 32768


class _Unchunked(torch.autograd.Function):
    """The engine's vocab-parallel CE before 2026-12-03, at tp = 1: whole-tensor fp32,
    the softmax kept for backward."""

    @staticmethod
    def forward(ctx, logits_bsv, labels_bs):
        logits = logits_bsv.float()
        shifted = logits - logits.max(dim=-1).values.unsqueeze(-1)
        exp = shifted.exp()
        sum_exp = exp.sum(-1)
        loss = sum_exp.log() - shifted.gather(-1, labels_bs.unsqueeze(-1)).squeeze(-1)
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), labels_bs)
        ctx.dtype = logits_bsv.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_bs):
        softmax, labels = ctx.saved_tensors
        onehot = torch.zeros_like(softmax).scatter_(-1, labels.unsqueeze(-1), 1.0)
        return ((softmax - onehot) * grad_bs.float().unsqueeze(-1)).to(ctx.dtype), None


def _candidates(logits: torch.Tensor, labels: torch.Tensor):
    def run(loss_fn):
        def call():
            x = logits.detach().requires_grad_()
            loss_fn(x).sum().backward()
        return call
    return {
        "chunked": run(lambda x: vocab_parallel_cross_entropy(x, labels, None)),
        "unchunked_before": run(lambda x: _Unchunked.apply(x, labels)),
        "torch_fp32_copy": run(lambda x: F.cross_entropy(x.float().flatten(0, 1), labels.flatten(),
                                                          reduction="none")),
    }


def _peak_bytes(call) -> int:
    with LiveStorageTracker() as tracker:
        call()
    return tracker.peak_bytes


def main() -> None:
    args = rounds_args(__doc__, rounds=5)
    tokens, vocab = TOKENS, VOCAB
    gen = torch.Generator().manual_seed(0)
    result, rows = {"tokens": tokens, "vocab": vocab, "rounds": args.rounds}, []
    for dtype in (torch.bfloat16, torch.float32):
        logits = (3 * torch.randn(1, tokens, vocab, generator=gen)).to(dtype)
        labels = torch.randint(0, vocab, (1, tokens), generator=gen)
        candidates = _candidates(logits, labels)
        times = interleaved_rounds(candidates, args.rounds)
        peaks = {name: _peak_bytes(call) for name, call in candidates.items()}
        name = str(dtype).removeprefix("torch.")
        result[name] = {"median_s": {k: median(v) for k, v in times.items()},
                        "ratio_to_before": {k: median_ratio(v, times["unchunked_before"]) for k, v in times.items()},
                        "peak_bytes": peaks, "times_s": times}
        rows += [[name, k, result[name]["median_s"][k] * 1e3, result[name]["ratio_to_before"][k], peaks[k] / 1e6]
                 for k in candidates]
    print_table(f"LM loss forward + backward, {tokens} tokens x {vocab} vocab, CPU, 1 thread, "
                f"median of {args.rounds} rounds", ["logits", "variant", "ms", "x before", "peak MB"], rows)
    write_json("cross_entropy", result, args.json)


if __name__ == "__main__":
    main()

"""AdamW on the optimizer's flat ranges: torch's per-tensor kernel vs the chunked loop.

Candidates, all on the same fp32 ranges (those of a fine64 step's buckets), CPU, one thread:
- per_tensor:   torch.optim.adamw.adamw (foreach=False), what FoldedOptimizer ran before;
- chunk_<n>:    engine.optim.adamw.chunked_adamw_ with chunks of n elements (bit-identical
                to per_tensor; checked here before timing);
- fused:        torch's fused=True CPU kernel, one pass but not bit-identical (reported for
                scale only; the max abs difference from per_tensor is printed).

    python -m benchmarks.adamw [--rounds 9]
"""
from __future__ import annotations


import torch
from torch.optim.adamw import adamw

from benchmarks.common import interleaved_rounds, median, median_ratio, print_table, rounds_args, write_json
from engine.optim.adamw import chunked_adamw_

HYPER = dict(lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
# The ranges of benchmarks/step_vs_hf.py's fine64 model: six expert stacks of 50 MB (one
# bucket each), the embedding, attention and head buckets, and the norm weights.
RANGES = [12_582_912] * 6 + [1_867_776, 1_048_576, 819_200, 1024, 1024, 512]
CHUNKS = (65536, 262144, 1_048_576, 4_194_304)


def make_state(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=gen) for n in RANGES]
    grads = [torch.randn(n, generator=gen) * 1e-2 for n in RANGES]
    return params, grads, [torch.zeros(n) for n in RANGES], [torch.zeros(n) for n in RANGES]


def torch_step(state, step: int, fused: bool) -> None:
    params, grads, m, v = state
    steps = [torch.tensor(float(step - 1)) for _ in params]    # the kernel increments them
    adamw(params, grads, m, v, [], steps, foreach=False, fused=fused or None, amsgrad=False,
          maximize=False, **HYPER)


def chunked_step(state, step: int, chunk: int) -> None:
    chunked_adamw_(*state, step=step, chunk_elems=chunk, **HYPER)


def check_bit_exact(steps: int = 3) -> dict:
    ref = make_state()
    for s in range(1, steps + 1):
        torch_step(ref, s, fused=False)
    out = {}
    for chunk in CHUNKS:
        state = make_state()
        for s in range(1, steps + 1):
            chunked_step(state, s, chunk)
        if not all(torch.equal(a, b) for xs, ys in zip(state, ref) for a, b in zip(xs, ys)):
            raise AssertionError(f"chunk {chunk}: not bit-identical to torch's per-tensor AdamW")
        out[f"chunk_{chunk}"] = 0.0
    fused = make_state()
    for s in range(1, steps + 1):
        torch_step(fused, s, fused=True)
    out["fused"] = max(float((a - b).abs().max()) for a, b in zip(fused[0], ref[0]))
    return out


def candidates() -> dict:
    def runner(update):
        state, counter = make_state(), iter(range(1, 10**9))
        return lambda: update(state, next(counter))
    out = {"per_tensor": runner(lambda st, s: torch_step(st, s, fused=False))}
    for chunk in CHUNKS:
        out[f"chunk_{chunk}"] = runner(lambda st, s, c=chunk: chunked_step(st, s, c))
    out["fused"] = runner(lambda st, s: torch_step(st, s, fused=True))
    return out


def main() -> None:
    args = rounds_args(__doc__)
    max_abs_diff = check_bit_exact()
    times = interleaved_rounds(candidates(), args.rounds)
    ratios = {k: median_ratio(v, times["per_tensor"]) for k, v in times.items()}
    print_table(f"AdamW over {sum(RANGES)} fp32 elements, CPU, 1 thread, median of {args.rounds} rounds",
                ["candidate", "median s", "time / per_tensor", "max |diff| vs per_tensor"],
                [[k, median(v), ratios[k], max_abs_diff.get(k, 0.0)] for k, v in times.items()])
    write_json("adamw", {"rounds": args.rounds, "elements": sum(RANGES),
                         "median_s": {k: median(v) for k, v in times.items()},
                         "ratio_to_per_tensor": ratios, "max_abs_diff_vs_per_tensor": max_abs_diff,
                         "times_s": times}, args.json)


if __name__ == "__main__":
    main()

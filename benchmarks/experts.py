"""The expert FFN (SwiGLU) forward + backward: grouped GEMM vs loops vs one dense GEMM.

Candidates, all on the same N = T k rows sorted by expert (a real top-k routing of
random scores, so the splits are uneven), CPU, one thread:
- grouped:        engine.moe.experts.grouped_swiglu (torch._grouped_mm, device offsets);
- fused_gate_up:  the same with gate and up fused into one [E, h, 2F] GEMM, the weight built
                  by torch.cat from the two parameters every call (as it would have to be);
- unbind:         the fallback, one GEMM per expert over w.unbind(0);
- loop_index:     one GEMM per expert indexing w[e] (the code before issue 11);
- dense:          one SwiGLU with a single [h, F] weight set over all N rows: the same FLOPs
                  with the best GEMM shape, the floor for any grouping.

The dense weights (3 h F values) stay in cache; the grouped ones are E times larger and cross
memory three times per step (forward and dx read the stacks, dW writes them). `floor` is
dense time + those bytes / the measured copy bandwidth: the best grouped time when the GEMMs
run at the dense rate (at few rows per expert the grouped FFN is bound by its weights).

    python -m benchmarks.experts [--rounds 5] [--glibc-default]
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from benchmarks.common import interleaved_rounds, median, median_ratio, one_thread, print_table, write_json
from engine.moe.assignment import build_assignments
from engine.moe.experts import GroupedMM, grouped_swiglu
from engine.train.host_allocator import ENV_SWITCH, retain_freed_host_memory

SHAPES = {"fine64": dict(experts=64, top_k=6, hidden=512, ffn=384),
          "mixtral": dict(experts=8, top_k=2, hidden=512, ffn=1792)}
TOKENS = {"fine64": (256, 1024, 4096), "mixtral": (1024,)}


def _loop_index(x_nh, counts, w_gate, w_up, w_down):
    outputs = []
    for e, x_ch in enumerate(torch.split(x_nh, counts)):
        outputs.append((F.silu(x_ch @ w_gate[e]) * (x_ch @ w_up[e])) @ w_down[e])
    return torch.cat(outputs)


def _unbind(x_nh, counts, w_gate, w_up, w_down):
    outputs = [(F.silu(x_ch @ g) * (x_ch @ u)) @ d for x_ch, g, u, d in
               zip(torch.split(x_nh, counts), w_gate.unbind(0), w_up.unbind(0), w_down.unbind(0))]
    return torch.cat(outputs)


def _fused_gate_up(x_nh, counts_e, w_gate, w_up, w_down):
    offs = torch.cumsum(counts_e, 0, dtype=torch.int32)
    gate_up = GroupedMM.apply(x_nh, torch.cat([w_gate, w_up], dim=2), offs, False)
    gate, up = gate_up.chunk(2, dim=-1)
    return GroupedMM.apply(F.silu(gate) * up, w_down, offs, False)


def make_inputs(experts, top_k, hidden, ffn, tokens, seed=0):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(tokens, experts, generator=gen)
    probs, chosen = scores.topk(top_k, dim=-1)
    assign = build_assignments(probs, chosen, experts)
    x_nh = torch.randn(assign.token_n.numel(), hidden, generator=gen).requires_grad_(True)
    weights = [(torch.randn(experts, hidden, ffn, generator=gen) * 0.02).requires_grad_(True),
               (torch.randn(experts, hidden, ffn, generator=gen) * 0.02).requires_grad_(True),
               (torch.randn(experts, ffn, hidden, generator=gen) * 0.02).requires_grad_(True)]
    dense = [(torch.randn(hidden, ffn, generator=gen) * 0.02).requires_grad_(True),
             (torch.randn(hidden, ffn, generator=gen) * 0.02).requires_grad_(True),
             (torch.randn(ffn, hidden, generator=gen) * 0.02).requires_grad_(True)]
    grad = torch.randn(x_nh.shape[0], hidden, generator=gen)
    return assign.counts_e, x_nh, weights, dense, grad


def candidates(counts_e, x_nh, weights, dense, grad, with_loop: bool):
    counts = counts_e.tolist()
    tensors = [x_nh, *weights, *dense]

    def run(fn):
        def step():
            fn().backward(grad)
            for t in tensors:
                t.grad = None
        return step
    out = {"grouped": run(lambda: grouped_swiglu(x_nh, counts_e, *weights)),
           "fused_gate_up": run(lambda: _fused_gate_up(x_nh, counts_e, *weights)),
           "unbind": run(lambda: _unbind(x_nh, counts, *weights)),
           "dense": run(lambda: (F.silu(x_nh @ dense[0]) * (x_nh @ dense[1])) @ dense[2])}
    if with_loop:
        out["loop_index"] = run(lambda: _loop_index(x_nh, counts, *weights))
    return out


def copy_bytes_per_s(repeats: int = 7) -> float:
    """Bytes read + written per second by a 128 MiB copy into a preallocated buffer."""
    src = torch.ones(32 << 20)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * src.nbytes / median(times)


def weight_bytes(experts, hidden, ffn) -> int:
    """fp32 bytes the grouped FFN moves for its weights per step beyond the dense one's: the
    stacks read in forward and again for dx, the gradient stacks written (and first read)."""
    return (1 + 1 + 2) * 3 * experts * hidden * ffn * 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--glibc-default", action="store_true",
                        help="leave glibc malloc at its defaults (FOLDMOE_HOST_MALLOC=default), "
                             "instead of a CPU worker's settings")
    parser.add_argument("--loop-max-rows", type=int, default=2048,
                        help="skip loop_index above this many rows (its backward is O(E^2))")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.glibc_default:
        os.environ[ENV_SWITCH] = "default"
    one_thread()
    bandwidth = copy_bytes_per_s()
    rows, results = [], []
    for shape_name, shape in SHAPES.items():
        for tokens in TOKENS[shape_name]:
            inputs = make_inputs(**shape, tokens=tokens)
            n = inputs[1].shape[0]
            times = interleaved_rounds(candidates(*inputs, with_loop=n <= args.loop_max_rows), args.rounds)
            flops = 3 * 2 * 3 * n * shape["hidden"] * shape["ffn"]     # 3 GEMMs x fwd + 2 bwd
            result = {"shape": shape_name, **shape, "tokens": tokens, "rows": n,
                      "median_s": {k: median(v) for k, v in times.items()},
                      "gflops": {k: flops / median(v) / 1e9 for k, v in times.items()},
                      "ratio_to_dense": {k: median_ratio(v, times["dense"]) for k, v in times.items()},
                      "times_s": times}
            floor_s = median(times["dense"]) + weight_bytes(**{k: shape[k] for k in ("experts", "hidden", "ffn")}) / bandwidth
            result["memory_floor_ratio"] = floor_s / median(times["dense"])
            results.append(result)
            r = result["ratio_to_dense"]
            rows.append([shape_name, tokens, n // shape["experts"], result["gflops"]["grouped"],
                         r["grouped"], result["memory_floor_ratio"], r["fused_gate_up"], r["unbind"],
                         r.get("loop_index", "-")])
    print_table(f"expert FFN fwd+bwd, CPU, 1 thread, median of {args.rounds} rounds; time / dense time "
                f"(copy {bandwidth / 1e9:.1f} GB/s; {retain_freed_host_memory()})",
                ["shape", "tokens", "rows/expert", "grouped GFLOP/s", "grouped", "floor", "fused_gate_up",
                 "unbind", "loop_index"], rows)
    write_json("experts", {"rounds": args.rounds, "copy_bytes_per_s": bandwidth, "results": results},
               args.json)


if __name__ == "__main__":
    main()

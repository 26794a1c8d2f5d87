"""Context-parallel attention per layer and micro-batch on one rank, for the cost model: the
bytes it sends (all-to-all and ring apart, since the engine overlaps only the ring) and the HBM
bytes it reads and writes around its attention blocks (engine/context_parallel/).

CP flavours (ParallelConfig.cp_mode): ring = a ring over all cp ranks; a2a = one Ulysses
all-to-all over cp ranks; hybrid = all-to-all inside groups of P = cp_a2a_size consecutive
members, ring of R = cp/P across them. Causal attention (what the planner plans for).

Notation: Nq = b·(s/cp)·n_q·d query elements of this rank (the same before and after the
all-to-all), Nkv = b·(s/cp)·n_kv·d, kv heads repeated `factor` times when a group has more
ranks than kv heads (Nkv' = factor·Nkv after the all-to-all), e bytes per activation.

HBM bytes (reads + writes of each op; views and same-place copies are free), counted op by op
against the engine's code in tests/engine/planner/test_cp_traffic.py:
- ring, on the busiest rank (the last ring position: every step covers all its queries and the
  ring runs in lockstep): K/V are stacked into one message (4e·Nkv' each pass); forward turns
  the first block's out to fp32 and the result back (2·c, c = e + 4 unless e = 4), and merges
  each later block in fp32 (40 + c per query element: two subtractions, a product, a copy);
  backward zero-fills and adds into the fp32 dq (4 + R(8 + e) + c) and the dK/dV accumulators
  that travel with the blocks ((8 + 2c) + (R + 1)(8 + e) per Nkv': the own block whole, the
  others' first halves).
- all-to-all: the packing of q, k, v, its permutes around the exchange and the causal reorder
  copy the packed elements (Nq + 2·Nkv') 3 times each pass, out 2 times, at every b (the
  reorder is one gather to or from the exchanged blocks, engine/context_parallel/ulysses.py);
  backward also re-lays dq (and dK/dV, or sums the repeated heads' gradients).
"""
from __future__ import annotations

from dataclasses import dataclass
from math import gcd

from engine.config.model import ModelConfig
from engine.config.train import TrainConfig
from engine.parallel.config import ParallelConfig

from .shards import local_kv_heads

FP32 = 4


@dataclass(frozen=True)
class CpShape:
    """One micro-batch's attention core on one rank (q/kv heads of its TP rank)."""
    batch: int
    local_tokens: int      # s / cp (per sequence)
    q_heads: int
    kv_heads: int
    head_dim: int
    cp: int
    a2a_size: int          # 1 ring, cp a2a, else hybrid
    act_bytes: int

    @property
    def ring_size(self) -> int:
        return self.cp // self.a2a_size

    @property
    def kv_factor(self) -> int:
        """kv head repetition before the all-to-all (engine.context_parallel.ulysses.kv_replication)."""
        return self.a2a_size // gcd(self.kv_heads, self.a2a_size) if self.a2a_size > 1 else 1

    @property
    def q_elems(self) -> int:
        return self.batch * self.local_tokens * self.q_heads * self.head_dim

    @property
    def kv_elems(self) -> int:
        return self.batch * self.local_tokens * self.kv_heads * self.head_dim

    @property
    def block_tokens(self) -> int:
        """Key block length of the attention kernel: the zigzag chunk of the ring (s/(2R)) or,
        with no ring, the whole sequence the all-to-all gathers."""
        s = self.local_tokens * self.cp
        return s // (2 * self.ring_size) if self.ring_size > 1 else s


def cp_shape(cfg: ModelConfig, p: ParallelConfig, train: TrainConfig) -> CpShape:
    """The attention core of one micro-batch on one rank under p's CP flavour."""
    return CpShape(train.micro_batch_size, train.seq_len // p.cp, cfg.num_heads // p.tp,
                   local_kv_heads(cfg.num_kv_heads, p.tp), cfg.dim_head, p.cp, p.cp_a2a_group_size,
                   2 if train.precision == "bf16" else 4)


def cp_comm_bytes(shape: CpShape) -> dict[str, float]:
    """{'a2a_fwd', 'a2a_bwd', 'ring_fwd', 'ring_bwd'}: bytes this rank sends per layer, as
    engine.context_parallel.volume.cp_bytes counts them (all-to-all and ring apart)."""
    e, p, r = shape.act_bytes, shape.a2a_size, shape.ring_size
    token_row = shape.batch * shape.local_tokens * shape.head_dim
    kv_heads = shape.kv_heads * shape.kv_factor
    a2a = (p - 1) * token_row * (2 * shape.q_heads + 2 * kv_heads) / p * e if p > 1 else 0.0
    message = 2 * token_row * kv_heads
    ring_fwd = (r - 1) * message * e
    ring_bwd = ring_fwd + (r * message * FP32 if r > 1 else 0)
    return {"a2a_fwd": a2a, "a2a_bwd": a2a, "ring_fwd": float(ring_fwd), "ring_bwd": float(ring_bwd)}


def _ring_hbm(shape: CpShape) -> tuple[float, float]:
    r, e = shape.ring_size, shape.act_bytes
    if r == 1:
        return 0.0, 0.0
    nq, nkv = shape.q_elems, shape.kv_elems * shape.kv_factor
    cast = 0 if e == FP32 else e + FP32
    forward = 4 * e * nkv + 2 * cast * nq + (r - 1) * (40 + cast) * nq
    backward = (4 * e * nkv + (4 + r * (8 + e) + cast) * nq
                + (8 + 2 * cast + (r + 1) * (8 + e)) * nkv)
    return float(forward), float(backward)


def _a2a_hbm(shape: CpShape) -> tuple[float, float]:
    if shape.a2a_size == 1:
        return 0.0, 0.0
    e, nq, factor = shape.act_bytes, shape.q_elems, shape.kv_factor
    packed = nq + 2 * factor * shape.kv_elems
    passes = 2 * packed * 3 + 2 * nq * 2
    repeat_fwd = 4 * factor * shape.kv_elems if factor > 1 else 0
    kv_grads = 2 * (factor + 1) * shape.kv_elems if factor > 1 else 4 * shape.kv_elems
    return float(e * (passes + repeat_fwd)), float(e * (passes + 2 * nq + kv_grads))


def cp_hbm_bytes(shape: CpShape) -> tuple[float, float]:
    """(forward, backward) HBM bytes the CP core moves besides its attention blocks."""
    ring, a2a = _ring_hbm(shape), _a2a_hbm(shape)
    return ring[0] + a2a[0], ring[1] + a2a[1]

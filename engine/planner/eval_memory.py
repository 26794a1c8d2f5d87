"""The memory model of forward-only evaluation (`foldmoe eval`): the model's shards and no
optimizer (engine/train/model_shards.py), forwards under no_grad.

Per PP rank:
- params: this rank's shards in the model dtype (engine/planner/shards.py); no fp32 main
  grads, no master copy, no Adam moments;
- activations: nothing is kept for a backward, so the peak is one layer's forward, bounded
  above by everything that layer writes (what training keeps of it, plus the token
  exchange of a MoE layer), or on the last stage the head's input, its logits and the
  loss's one fp32 row slice (whichever is larger), plus the pipeline's buffers in flight:
  the received input and the sent output of one chunk (the executor releases each output once sent,
  engine/pipeline/executor.py). An upper bound by construction: the measured forward
  peaks are 4-56% below it on CPU (tests/engine/planner/test_eval_memory.py) while the
  weights are exact, and at real size the weights dominate.
"""
from __future__ import annotations

import dataclasses

from engine.config.model import ModelConfig
from engine.config.train import TrainConfig
from engine.parallel.config import ParallelConfig

from .memory import FP32, MemoryEstimate, RoleMemory, layer_figures, role_name
from .shards import ChunkKinds, rank_chunks, rank_params, summarize


def _forward_peak(figures, summary: ChunkKinds, pp: int) -> tuple[int, int, dict]:
    """(peak forward bytes, of which dispatcher rows, parts) of a rank holding `summary`."""
    layer = max(figures.saved[False] if summary.dense else 0,
                figures.saved[True] + figures.exchange if summary.moe else 0)
    head = figures.head + figures.loss_slice if summary.last else 0   # no logit gradient in eval
    in_flight = 2 * figures.chunk_output if pp > 1 else 0
    embedding = figures.embedding if summary.first else 0
    working = max(layer, head)
    dispatcher = figures.exchange if summary.moe and working == layer else 0
    return working + in_flight + embedding, dispatcher, {"working": working, "pipeline": in_flight}


def estimate_eval_memory(cfg: ModelConfig, p: ParallelConfig, train: TrainConfig,
                         dispatcher: str = "alltoall") -> MemoryEstimate:
    """Predicted memory of every PP rank of `foldmoe eval` in layout `p` (module docstring);
    `activations_worst` uses the worst-case routing of the training model."""
    # A layer's forward writes the same under every recompute mode (no_grad keeps nothing).
    forward = dataclasses.replace(train, recompute="none")
    expected = layer_figures(cfg, p, forward, dispatcher=dispatcher)
    worst = layer_figures(cfg, p, forward, worst=True, dispatcher=dispatcher)
    param_bytes = 2 if train.precision == "bf16" else FP32
    ranks = []
    for pp_rank, kinds in enumerate(rank_chunks(cfg, p.pp, p.vpp, train.seq_len)):
        count, summary = rank_params(cfg, p, kinds), summarize(kinds)
        activations, dispatcher, parts = _forward_peak(expected, summary, p.pp)
        ranks.append(RoleMemory(role_name(pp_rank, p.pp), pp_rank, param_bytes * count.total, 0, 0,
                                activations, dispatcher, _forward_peak(worst, summary, p.pp)[0],
                                count, parts))
    return MemoryEstimate(ranks)

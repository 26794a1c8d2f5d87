"""The planner's per-kind layer figures come from a layer of that kind, wherever the
config puts its MoE layers (first_k_dense, moe_layer_step, dense_layers)."""
from __future__ import annotations

import pytest

from engine.config.model import get_preset
from engine.config.train import TrainConfig
from engine.parallel.config import ParallelConfig
from engine.planner.activations import MicroBatchShape, layer_bytes
from engine.planner.memory import dispatch_rows, layer_figures
from engine.planner.shards import chunk_layers, kind_layer_id, rank_chunks, rank_params, stage_params

TRAIN = TrainConfig(global_batch_size=8, micro_batch_size=2, seq_len=128)


@pytest.mark.parametrize("overrides,moe_ids", [
    ({"first_k_dense": 2, "moe_layer_step": 2}, [3, 5]),     # layer first_k_dense is dense
    ({"first_k_dense": 0, "moe_layer_step": 2}, [1, 3, 5]),  # layer 0 is dense
    ({"first_k_dense": 0, "moe_layer_step": 1}, [0, 1, 2, 3, 4, 5]),
])
def test_kind_layers_and_counts_follow_the_config(overrides, moe_ids):
    cfg = get_preset("tiny-moe", num_layers=6, **overrides)
    assert [i for i in range(6) if cfg.is_moe_layer(i)] == moe_ids
    assert kind_layer_id(cfg, True) == moe_ids[0]
    assert not cfg.is_moe_layer(kind_layer_id(cfg, False)) or cfg.num_dense_layers == 0
    p = ParallelConfig(world_size=8, tp=2, pp=2, ep=2)
    chunks = chunk_layers(cfg, p, TRAIN.seq_len)
    for rank, kinds in enumerate(rank_chunks(cfg, p.pp, p.vpp, TRAIN.seq_len)):
        # the fast per-kind count equals the layer-by-layer one
        assert rank_params(cfg, p, kinds) == stage_params(cfg, p, chunks, rank)
    figures = layer_figures(cfg, p, TRAIN)
    mb = MicroBatchShape(TRAIN.micro_batch_size, TRAIN.seq_len, p.tp, 4)
    rows = dispatch_rows(cfg, p, mb.sp_tokens, worst=False)
    assert figures.saved[True] == layer_bytes(cfg, moe_ids[0], mb, rows, p.etp, "none")

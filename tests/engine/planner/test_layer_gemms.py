"""The planner's GEMM list (engine/planner/cost.py `layer_gemms`, `head_gemm`, the shapes
benchmarks/planner_gemms.py times on a device) against the model FLOPs of
engine/metrics/flops.py, an independent count: summed over the tp x cp ranks that share a
micro-batch (and over the EP group, which the expected routing balances), one layout's
forward GEMMs are the model's linear FLOPs / 3, router aside."""
from __future__ import annotations

import pytest

from engine.config.model import get_preset
from engine.config.train import TrainConfig
from engine.metrics.flops import attention_projection_flops_per_token, ffn_flops_per_token, logits_flops_per_token
from engine.parallel.config import ParallelConfig
from engine.planner.cost import head_gemm, layer_gemms

TRAIN = TrainConfig(global_batch_size=64, micro_batch_size=2, seq_len=4096)


def _forward_flops(gemms) -> float:
    return sum(2 * g.m * g.k * g.n * g.count for g in gemms if g.name != "router")


@pytest.mark.parametrize("preset", ["qwen2-57b-a14b", "mixtral-8x22b"])
@pytest.mark.parametrize("layout", [dict(), dict(tp=2, ep=4), dict(cp=2, ep=8), dict(tp=4, ep=2, etp=2),
                                    dict(tp=2, cp=2, ep=8)], ids=str)
def test_gemms_sum_to_the_model_flops(preset, layout):
    cfg = get_preset(preset)            # dropless: every routed token reaches its experts
    p = ParallelConfig(world_size=64, **layout)
    sharing = p.tp * p.cp
    tokens = TRAIN.micro_batch_size * TRAIN.seq_len
    per_layer = {kind: sharing * _forward_flops(layer_gemms(cfg, kind, p, TRAIN)) for kind in (False, True)}
    total = per_layer[False] * cfg.num_dense_layers + per_layer[True] * cfg.num_moe_layers
    head = sharing * _forward_flops([head_gemm(cfg, p, TRAIN)])
    model = tokens * (ffn_flops_per_token(cfg) + attention_projection_flops_per_token(cfg)) / 3
    assert total == pytest.approx(model, rel=1e-9)
    assert head == pytest.approx(tokens * logits_flops_per_token(cfg) / 3, rel=1e-9)


def test_expert_rows_follow_ep():
    cfg = get_preset("qwen2-57b-a14b")
    train = TrainConfig(global_batch_size=256, micro_batch_size=1, seq_len=4096)

    def experts(**layout):
        (gate,) = [g for g in layer_gemms(cfg, True, ParallelConfig(world_size=64, **layout), train)
                   if g.name == "experts gate"]
        return gate.m, gate.count
    # 2,048 tokens per rank (TP2 SP) x top-8 over 64 experts: 256 rows per expert per rank,
    # times the EP ranks that send to it
    assert experts(tp=2, ep=4) == (1024, 16)
    assert experts(tp=2, ep=8) == (2048, 8)


def test_the_gemm_benchmark_times_every_gemm_of_the_chosen_layouts(tmp_path):
    import json

    from benchmarks.planner_gemms import main
    out = tmp_path / "gemms.json"
    main(["--preset", "tiny-moe", "--gpus", "4", "--top", "1", "--only", "tp=2,ep=2", "--seq", "128",
          "--rounds", "1", "--device", "cpu", "--json", str(out)])
    result = json.loads(out.read_text())
    layouts = result["layouts"]
    assert len(layouts) == 2 and layouts[0]["rank"] == 0 and "tp2" in layouts[1]["layout"]
    cfg = get_preset("tiny-moe")
    for entry in layouts:
        moe = entry["parts"]["moe layer"]
        assert [g["name"] for g in moe][:3] == ["qkv", "attention out", "router"]
        assert len(moe) == 3 + 3 + 3 * (cfg.moe.num_shared_experts > 0)
        assert all(g["measured_s"] > 0 and g["predicted_s"] > 0 for part in entry["parts"].values() for g in part)

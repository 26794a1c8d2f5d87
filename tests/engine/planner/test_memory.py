"""The memory model's arithmetic, against hand-computed cases and the engine's own schedules."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from engine.config.model import get_preset
from engine.models.transformer import count_parameters
from engine.parallel.config import ParallelConfig
from engine.pipeline.schedules import build_schedule
from engine.planner.activations import DispatchRows, MicroBatchShape, layer_bytes, unkept_bytes
from engine.planner.memory import dispatch_rows, estimate_memory, optimizer_step_bytes, _state_bytes
from engine.planner.schedule_memory import in_flight_per_chunk
from engine.planner.shards import ParamCount, chunk_layers, stage_params
from engine.config.train import TrainConfig


def test_stage_params_hand_counted_tiny_tp2_pp2_ep4():
    # tiny-moe: h 64, 4 heads (d 16), 2 kv heads, dense F 128 (layer 0), 8 experts of F 32,
    # one shared expert of F 32, vocab 512. TP2: 2 q heads, 1 kv head per rank.
    cfg = get_preset("tiny-moe")
    p = ParallelConfig(world_size=8, tp=2, pp=2, ep=4)
    chunks = chunk_layers(cfg, p, 128)
    assert chunks == [[0, 1], [2, 3]]
    attention = 64 * 16 * (2 * 2 + 2 * 1) + 2 * 64            # wq wo wk wv + 2 norms = 6272
    dense_ffn = 3 * 64 * 128 // 2                               # 12288
    moe_dense = 3 * 64 * 32 // 2 + 64 * 8                       # shared expert + router = 3584
    experts = 2 * 3 * 64 * 32                                   # 8 / ep4 = 2 experts = 12288
    table = 512 * 64 // 2                                       # vocab-parallel = 16384
    first = stage_params(cfg, p, chunks, 0)
    last = stage_params(cfg, p, chunks, 1)
    assert first == ParamCount(dense=table + 2 * attention + dense_ffn + moe_dense, expert=experts)
    assert last == ParamCount(dense=2 * attention + 2 * moe_dense + table + 64, expert=2 * experts)


def test_mixtral_8x7b_tp2_pp2_ep8_bytes_per_rank():
    cfg = get_preset("mixtral-8x7b")
    p = ParallelConfig(world_size=16, tp=2, pp=2, ep=8)
    chunks = chunk_layers(cfg, p, 4096)
    assert [len(c) for c in chunks] == [16, 16]
    # per layer: attention 4096*128*(2*16 + 2*4) + 2 norms, router 4096*8, one expert 3*4096*14336
    dense_layer = 4096 * 128 * 40 + 2 * 4096 + 4096 * 8
    expert_layer = 3 * 4096 * 14336
    count = stage_params(cfg, p, chunks, 0)
    assert count == ParamCount(dense=16 * dense_layer + 32000 * 4096 // 2, expert=16 * expert_layer)
    train = TrainConfig(global_batch_size=256, seq_len=4096, precision="bf16", zero1=True)
    params, grads, optimizer = _state_bytes(count, p, train)
    assert params == 2 * count.total and grads == 4 * count.total
    # ZeRO-1: dense state over dp*cp = 4, experts over edp = 16 / (1*8*2) = 1; 12 B per element
    assert optimizer == int(12 * (count.dense / 4 + count.expert / 1))


def test_stages_together_hold_the_whole_model_once():
    for name in ("tiny-moe", "mixtral-8x7b", "qwen2-57b-a14b", "deepseek-moe-16b"):
        cfg = get_preset(name)
        for pp, vpp in ((1, 1), (2, 1), (2, 2), (4, 1)):
            p = ParallelConfig(world_size=pp, pp=pp, vpp=vpp)
            chunks = chunk_layers(cfg, p, 128)
            held = sum((stage_params(cfg, p, chunks, r) for r in range(pp)), ParamCount())
            assert held.total == count_parameters(cfg)["total"], (name, pp, vpp)


@pytest.mark.parametrize("precision,zero1,expected", [
    ("bf16", True, 12 * (1000 / 4 + 800 / 4)), ("bf16", False, 12 * 1800),
    ("fp32", True, 8 * (1000 / 4 + 800 / 4)), ("fp32", False, 8 * 1800)])
def test_optimizer_state_shards_dense_over_dp_cp_and_experts_over_edp(precision, zero1, expected):
    p = ParallelConfig(world_size=4, cp=2)                   # dp 2 x cp 2 = 4; edp 4
    train = TrainConfig(precision=precision, zero1=zero1)
    params, grads, optimizer = _state_bytes(ParamCount(dense=1000, expert=800), p, train)
    assert params == (2 if precision == "bf16" else 4) * 1800 and grads == 4 * 1800
    assert optimizer == int(expected)


def test_optimizer_step_working_memory_is_the_engines_chunked_update():
    p = ParallelConfig(world_size=4, ep=2)                   # dp 4, edp 2
    count, largest = ParamCount(dense=8_000_000, expert=20_000_000), ParamCount(1_000_000, 9_000_000)
    # AdamW's one scratch chunk of 2^20 fp32 (engine/optim/adamw.py), with or without ZeRO-1
    assert optimizer_step_bytes(count, largest, p, zero1=False) == 4 * 2**20
    assert optimizer_step_bytes(count, largest, p, zero1=True) == 4 * 2**20
    # A bucket smaller than one chunk: the scratch is the bucket's owned range
    small = ParamCount(dense=40_000, expert=0)
    assert optimizer_step_bytes(small, ParamCount(10_000, 0), p, zero1=True) == 4 * 10_000
    # 10^11 owned elements: the norm's partial sums (fp32, its fp64 copy and square) dominate
    huge = ParamCount(dense=10**11, expert=0)
    assert optimizer_step_bytes(huge, ParamCount(10**9, 0), p, zero1=False) == 24 * -(-10**11 // 4096)


def test_optimizer_step_working_memory_matches_the_real_optimizer():
    """The peak bytes of the storages FoldedOptimizer's clip + step create, on one process."""
    from engine.optim.optimizer import FoldedOptimizer
    from engine.parallel.mesh import FoldedMesh
    from engine.planner.shards import ParamCount as Count
    from engine.testing.memory_probe import LiveStorageTracker

    sizes = [(3000, 700), (2048, 1024), (50_000,)]       # one tensor above a 2^20 chunk
    params = [(f"p{i}", torch.nn.Parameter(torch.randn(*shape))) for i, shape in enumerate(sizes)]
    mesh = FoldedMesh(ParallelConfig(world_size=1), rank=0, create_groups=False)
    opt = FoldedOptimizer(params, mesh, TrainConfig(grad_clip=1.0))
    opt.prepare_for_backward(1)
    sum((param.square().sum() for _, param in params)).backward()
    opt.finish_grad_sync()
    with LiveStorageTracker() as tracker:
        opt.clip_grad_norm(1.0)
        opt.step(0)
    total = sum(param.numel() for _, param in params)
    largest = max(param.numel() for _, param in params)
    predicted = optimizer_step_bytes(Count(dense=total, expert=0), Count(dense=largest, expert=0),
                                     mesh.config, zero1=False)
    assert predicted <= tracker.peak_bytes <= 1.05 * predicted + 4096, (tracker.peak_bytes, predicted)


def _peak_composition(program, num_chunks):
    live, best, best_live = [0] * num_chunks, None, -1
    for action in program:
        if action.kind in ("F", "B"):
            live[action.chunk] += 1 if action.kind == "F" else -1
            if sum(live) > best_live:
                best_live, best = sum(live), list(live)
    return best


def test_in_flight_matches_the_engine_schedules():
    for pp, vpp, mult in itertools.product((2, 3, 4), (1, 2, 3), (1, 2, 3)):
        m = pp * mult
        for schedule in (("interleaved",) if vpp > 1 else ("1f1b", "gpipe")):
            programs = build_schedule(schedule, pp, m, vpp)
            for rank in range(pp):
                got = in_flight_per_chunk(schedule, pp, vpp, m, rank)
                composition = _peak_composition(programs[rank], pp * vpp)
                assert list(got) == [composition[v * pp + rank] for v in range(vpp)], (schedule, pp, vpp, m, rank)


def test_layer_bytes_hand_counted():
    # h 8, 2 heads of d 4, 1 kv head, dense F 16; one sequence of 8 tokens, fp32, tp = cp = 1.
    cfg = get_preset("tiny-moe", hidden_size=8, num_heads=2, num_kv_heads=1, ffn_hidden_size=16,
                     first_k_dense=1)
    mb = MicroBatchShape(batch=1, seq_local=8, tp=1, act_bytes=4)
    rows = DispatchRows(0, 0)
    norm = 4 * (2 * 8 * 8 + 8)              # fp32 input, x*rsqrt, rsqrt
    attention = norm + 4 * 8 * 8 + 4 * 8 * 4 + 4 * 8 * 4 * (2 * 2 + 2 * 1) + 4 * 2 * 8
    ffn = norm + 4 * 8 * 8 + 3 * 4 * 8 * 16     # input; gate, up, product (silu recomputed)
    assert layer_bytes(cfg, 0, mb, rows, 1, "none") == attention + ffn == 4096
    assert layer_bytes(cfg, 0, mb, rows, 1, "selective") == 4096 - 4 * 2 * 8   # no lse
    assert layer_bytes(cfg, 0, mb, rows, 1, "full") == 4 * 8 * 8 + 8 * 8        # input + positions


def test_unkept_bytes_are_what_backward_recomputes_or_drops():
    # The cost model's elementwise traffic: silu(gate) of a dense SwiGLU; for a MoE layer
    # silu(gate) and the product in the experts, the combine's fp32 rows and weighted sum,
    # and a shared expert's silu(gate).
    cfg = get_preset("tiny-moe", hidden_size=8, ffn_hidden_size=16, moe_ffn_hidden_size=4,
                     moe_num_experts=4, first_k_dense=1, moe_num_shared_experts=0)
    mb = MicroBatchShape(batch=1, seq_local=8, tp=1, act_bytes=2)
    rows = DispatchRows(assigned=16, at_experts=16)
    assert unkept_bytes(cfg, 0, mb, rows, 1) == 2 * 8 * 16
    assert unkept_bytes(cfg, 1, mb, rows, 1) == 2 * 2 * 16 * 4 + (8 - 2) * 16 * 8
    shared = get_preset("tiny-moe", hidden_size=8, ffn_hidden_size=16, moe_ffn_hidden_size=4,
                        moe_num_experts=4, first_k_dense=1, moe_num_shared_experts=1,
                        moe_shared_ffn_hidden_size=12)
    assert unkept_bytes(shared, 1, mb, rows, 1) == unkept_bytes(cfg, 1, mb, rows, 1) + 2 * 8 * 12


def test_dispatch_rows_dropless_and_capacity():
    cfg = get_preset("tiny-moe")                              # 8 experts, top-2
    p = ParallelConfig(world_size=8, ep=4, etp=2)             # 2 local experts, dispatch group 8
    assert dispatch_rows(cfg, p, 100, worst=False) == DispatchRows(200, 400)
    assert dispatch_rows(cfg, p, 100, worst=True) == DispatchRows(200, 8 * 100 * 2)
    capped = get_preset("tiny-moe", moe_capacity_factor=1.25)
    capacity = math.ceil(100 * 2 / 8 * 1.25)                  # 32 per expert per rank
    assert dispatch_rows(capped, p, 100, worst=False) == DispatchRows(200, 400)
    assert dispatch_rows(capped, p, 100, worst=True) == DispatchRows(200, 8 * 2 * capacity)
    padded = get_preset("tiny-moe", moe_capacity_factor=1.25, moe_pad_to_capacity=True)
    assert dispatch_rows(padded, p, 100, worst=False) == DispatchRows(8 * capacity, 8 * 2 * capacity)


def test_estimate_names_roles_and_orders_pipeline_stages():
    cfg = get_preset("mixtral-8x7b")
    train = TrainConfig(global_batch_size=64, seq_len=4096, precision="bf16", zero1=True)
    est = estimate_memory(cfg, ParallelConfig(world_size=32, tp=2, pp=4, ep=8), train)
    assert [r.role for r in est.ranks] == ["stage 0 (first)", "stage 1", "stage 2", "stage 3 (last)"]
    # 1F1B: stage r holds pp - r micro-batches, so activations fall along the pipeline
    middle = [r.activations for r in est.ranks[1:3]]
    assert middle[0] > middle[1]
    assert all(r.total == r.params + r.grads + r.optimizer + r.activations for r in est.ranks)
    assert all(r.total_worst >= r.total for r in est.ranks)


def test_the_optimizer_figures_are_the_engines():
    # The planner is torch-free, so it keeps its own copies; a stale copy is how the
    # optimizer-step term drifted from the engine before (docs/performance.md).
    from engine.optim import adamw, buckets, clip
    from engine.planner import memory
    assert memory.NORM_CHUNK == clip.NORM_CHUNK
    assert memory.ADAM_CHUNK_ELEMS == adamw.CHUNK_ELEMS
    assert memory.BUCKET_BYTES == buckets.DEFAULT_BUCKET_BYTES


def test_the_loss_figures_are_the_engines():
    from engine.planner import activations
    from engine.tensor_parallel import cross_entropy
    # one fp32 slice of the loss: the GPU's, an upper bound of the CPU's
    assert activations.LOSS_ROW_CHUNK_ELEMS == cross_entropy.GPU_ROW_CHUNK_ELEMS
    assert cross_entropy.CPU_ROW_CHUNK_ELEMS <= cross_entropy.GPU_ROW_CHUNK_ELEMS

"""Model-level TP+SP parity: the tiny MoE transformer after `parallelize_tp` (plus
`parallelize_moe` with ep=1, which gives the MoE layers the stage group for their
aux-loss statistics) against the same model on one process: logits (vocab shards
gathered), loss, and every gradient (shards gathered, replicated grads SUM-reduced over
TP by the optimizer's own reduction, engine/testing/grads.py). Also the measured TP bytes against Megatron's TP+SP volume.
"""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from engine.config.model import get_preset
from engine.models.init import init_weights
from engine.models.transformer import MoETransformer
from engine.moe.parallelize import parallelize_moe
from engine.parallel.axes import Axis
from engine.parallel.config import ParallelConfig
from engine.parallel.mesh import FoldedMesh
from engine.parallel.param_attrs import apply_slices, is_tp_sharded, reduce_axes, slices, tp_dim, tp_replicas
from engine.tensor_parallel.loss import tp_loss
from engine.tensor_parallel.plan import kv_head_block, kv_replica_groups, parallelize_tp
from engine.testing.grads import TrainingGradSync
from engine.testing.multiprocess import run_distributed

BATCH, SEQ, SEED = 2, 8, 11
CASES = {  # name -> (tp, model overrides, recompute mode)
    "tp2": (2, {}, "none"),
    "tp2_dense_tied": (2, {"first_k_dense": 4, "tie_embeddings": True}, "none"),
    "tp2_full_recompute": (2, {}, "full"),                 # TP collectives replayed in backward
    "tp4_kv_replicated": (4, {"qkv_bias": True}, "none"),  # 2 kv heads < tp = 4
}


def _batch(cfg):
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1), generator=gen)
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    return tokens[:, :-1], tokens[:, 1:], positions


def _reference(cfg):
    model = MoETransformer(cfg)
    init_weights(model, cfg, SEED)
    ids, labels, positions = _batch(cfg)
    logits = model(ids, positions)
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum") / labels.numel()
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad for n, p in model.named_parameters()}, model


def _gather_full(param, grad, mesh):
    """The unsharded tensor from the TP shards of `grad` (kv replicas de-duplicated)."""
    if not is_tp_sharded(param):
        return grad
    parts = [torch.empty_like(grad) for _ in range(mesh.size("tp"))]
    dist.all_gather(parts, grad.contiguous(), group=mesh.group("tp"))
    replicas = tp_replicas(param)
    return torch.cat(parts[::replicas], dim=tp_dim(param))


def _parallel(cfg, mesh, recompute):
    model = MoETransformer(cfg)
    init_weights(model, cfg, SEED)
    parallelize_moe(model, mesh)
    comm = parallelize_tp(model, mesh)
    model.set_recompute(recompute)
    grad_sync = TrainingGradSync(list(model.named_parameters()), mesh)
    ids, labels, positions = _batch(cfg)
    before = mesh.traffic.snapshot()
    logits_local = model(ids, positions)
    loss = tp_loss(logits_local, labels, mesh, comm).sum() / labels.numel()
    loss.backward()
    tp_bytes = mesh.traffic.since(before).get(Axis.TP, 0)
    grad_sync.finish()
    logits = _gather_full_logits(logits_local.detach(), mesh)
    return logits, loss.detach(), model, tp_bytes


def _gather_full_logits(logits_local, mesh):
    parts = [torch.empty_like(logits_local) for _ in range(mesh.size("tp"))]
    dist.all_gather(parts, logits_local.contiguous(), group=mesh.group("tp"))
    return torch.cat(parts, dim=-1)


def _two_chunks(mesh):
    """Layers [0, 1] then [2, 3] as two pipeline chunks chained by hand: the hidden passed
    between them is the sequence-parallel shard [b, s/tp, h]."""
    cfg = get_preset("tiny-moe")
    _, _, ref_grads, _ = _reference(cfg)
    first = MoETransformer(cfg, [0, 1], first_stage=True, last_stage=False)
    last = MoETransformer(cfg, [2, 3], first_stage=False, last_stage=True)
    for chunk in (first, last):
        init_weights(chunk, cfg, SEED)
        parallelize_moe(chunk, mesh)
        parallelize_tp(chunk, mesh)
    grad_sync = TrainingGradSync([*first.named_parameters(), *last.named_parameters()], mesh)
    ids, labels, positions = _batch(cfg)
    hidden = first(ids, positions)
    (tp_loss(last(hidden, positions), labels, mesh).sum() / labels.numel()).backward()
    grad_sync.finish()
    grads = {}
    for chunk in (first, last):
        for pname, param in chunk.named_parameters():
            grads[pname] = (_gather_full(param, param.grad, mesh), ref_grads[pname])
    return {"hidden_shape": tuple(hidden.shape), "grads": grads, "complete": sorted(grads) == sorted(ref_grads)}


def _model_worker(rank, world, case_names, with_chunks=False):
    mesh = FoldedMesh(ParallelConfig(world_size=world, tp=world))
    out = {}
    for name in case_names:
        _, overrides, recompute = CASES[name]
        cfg = get_preset("tiny-moe", **overrides)
        ref_logits, ref_loss, ref_grads, ref_model = _reference(cfg)
        logits, loss, model, tp_bytes = _parallel(cfg, mesh, recompute)
        ref_params = dict(ref_model.named_parameters())
        grads, slices_ok, axes = {}, {}, {}
        for pname, param in model.named_parameters():
            grads[pname] = (_gather_full(param, param.grad, mesh), ref_grads[pname])
            local_ref = apply_slices(ref_params[pname].detach(), slices(param))
            slices_ok[pname] = torch.equal(param.detach(), local_ref)
            axes[pname] = (reduce_axes(param), is_tp_sharded(param))
        out[name] = {"logits": (logits, ref_logits), "loss": (loss, ref_loss), "grads": grads,
                     "slices_ok": slices_ok, "axes": axes, "tp_bytes": tp_bytes,
                     "names": sorted(ref_grads) == sorted(grads)}
    if with_chunks:
        out["chunks"] = _two_chunks(mesh)
    return out


@pytest.fixture(scope="module")
def tp2_results():
    return run_distributed(_model_worker, 2, ["tp2", "tp2_dense_tied", "tp2_full_recompute"], True)


@pytest.fixture(scope="module")
def tp4_results():
    return run_distributed(_model_worker, 4, ["tp4_kv_replicated"])


def _max_rel(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_loss_and_every_gradient_match_single_process(name, request):
    results = request.getfixturevalue("tp2_results" if CASES[name][0] == 2 else "tp4_results")
    for rank, per_rank in enumerate(results):
        res = per_rank[name]
        assert res["names"], "parameter names changed under TP"
        # fp32: TP reorders the reductions (row-parallel partial sums, SP reduce-scatters,
        # vocab-parallel CE), so results differ from one process by a few ulps (~1e-6 rel);
        # 1e-5 relative to each tensor's largest entry leaves margin without hiding a bug
        # (a missing or doubled TP reduction is an O(1) error).
        for key in ("logits", "loss"):
            assert _max_rel(*res[key]) < 1e-5, (name, rank, key, _max_rel(*res[key]))
        worst = max((_max_rel(a, e), p) for p, (a, e) in res["grads"].items())
        assert worst[0] < 1e-5, (name, rank, worst)
        assert all(res["slices_ok"].values()), [p for p, ok in res["slices_ok"].items() if not ok]


@pytest.mark.slow
def test_pipeline_chunks_pass_sequence_shards_and_match(tp2_results):
    for rank, per_rank in enumerate(tp2_results):
        res = per_rank["chunks"]
        assert res["hidden_shape"] == (BATCH, SEQ // 2, get_preset("tiny-moe").hidden_size)
        assert res["complete"]
        worst = max((_max_rel(a, e), p) for p, (a, e) in res["grads"].items())
        assert worst[0] < 1e-5, (rank, worst)   # same fp32 reordering bound as above


@pytest.mark.slow
def test_sequence_parallel_params_are_tagged_for_a_tp_sum(tp2_results):
    axes = tp2_results[0]["tp2"]["axes"]
    for name in ("layers.0.attn_norm.weight", "layers.1.ffn.router.weight", "norm.weight"):
        assert axes[name] == (("dp_cp", "tp"), False), name
    for name in ("layers.0.attention.wq.weight", "layers.1.ffn.shared_experts.w_down.weight",
                 "embed.weight", "head.weight"):
        assert axes[name] == (("dp_cp",), True), name
    assert axes["layers.1.ffn.experts.w_gate"] == (("edp",), False)   # left to parallelize_moe


def _megatron_tp_bytes(cfg, tp, batch, seq):
    """Analytic TP+SP volume per rank for one forward+backward (fp32 = 4 bytes).
    Each all-gather / reduce-scatter of a [b, s, h] buffer costs (tp-1)/tp of it.
    Layer (attention + dense FFN or shared expert): forward 2 AG + 2 RS, backward the same.
    Embedding: RS forward, AG backward. Head: AG forward, RS backward. Vocab-parallel CE:
    all-reduce of the row max [b, s] and of (sum-exp, target) [2, b, s] at 2(tp-1)/tp."""
    collective = (tp - 1) * batch * seq * cfg.hidden_size * 4 // tp
    layers = 8 * collective * cfg.num_layers
    ends = 2 * collective + 2 * collective
    cross_entropy = 2 * (tp - 1) * (batch * seq * 4) // tp + 2 * (tp - 1) * (2 * batch * seq * 4) // tp
    kv_grads = 0
    if cfg.num_kv_heads < tp:   # replicated kv: wk, wv (and biases) all-reduced over tp/n_kv ranks
        replicas = tp // cfg.num_kv_heads
        per_layer = 2 * cfg.dim_head * (cfg.hidden_size + (1 if cfg.qkv_bias else 0))
        kv_grads = cfg.num_layers * 2 * (replicas - 1) * per_layer * 4 // replicas
    return {"layers": layers, "embed_head": ends, "cross_entropy": cross_entropy, "kv_grads": kv_grads}


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n, case in sorted(CASES.items()) if case[2] == "none"])
def test_tp_bytes_equal_megatron_volume(name, request):
    tp, overrides, _ = CASES[name]
    results = request.getfixturevalue("tp2_results" if tp == 2 else "tp4_results")
    expected = _megatron_tp_bytes(get_preset("tiny-moe", **overrides), tp, BATCH, SEQ)
    for per_rank in results:
        assert per_rank[name]["tp_bytes"] == sum(expected.values()), (name, expected)


def test_kv_head_block_assignment_by_hand():
    # 4 q heads, 2 kv heads: q heads {0,1} read kv 0, {2,3} read kv 1.
    assert [kv_head_block(r, 2, 2) for r in range(2)] == [(0, 1), (1, 1)]
    assert [kv_head_block(r, 4, 2) for r in range(4)] == [(0, 1), (0, 1), (1, 1), (1, 1)]
    assert [kv_head_block(r, 2, 4) for r in range(2)] == [(0, 2), (2, 2)]
    assert [kv_head_block(r, 8, 1) for r in range(8)] == [(0, 1)] * 8


def test_kv_replica_groups_follow_tp_groups():
    mesh = FoldedMesh(ParallelConfig(world_size=8, tp=4), rank=0, create_groups=False)
    # TP groups [0..3], [4..7]; kv head 0 on TP ranks {0,1}, kv head 1 on {2,3}.
    assert kv_replica_groups(mesh, num_kv_heads=2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert kv_replica_groups(mesh, num_kv_heads=4) == []

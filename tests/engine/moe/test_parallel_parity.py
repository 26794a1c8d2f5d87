"""Multi-process parity (gloo, fp32): a sharded MoELayer equals the single-process layer.

Every rank builds the same full layer and input, computes the single-process reference
(with capacity groups = the rank owning each token, see assignment.py), then shards the
layer with parallelize_moe and runs its own token shard: batch rows by DP rank, a
contiguous sequence slice by TP (SP) and CP rank. Loss = sum(y * w) / global tokens;
grads are SUM-reduced over each param's axes by the optimizer's own reduction
(engine/testing/grads.py). Outputs, every gradient
(expert shards vs the slice of the full grad) and the logged aux/z/drop statistics must
match. Several cases run inside one spawn per world size to keep CI time low.
"""
import pytest
import torch

from engine.config.model import MoEConfig
from engine.moe.layer import MoELayer
from engine.moe.parallelize import expert_slice, parallelize_moe
from engine.parallel.axes import Axis
from engine.parallel.config import ParallelConfig
from engine.parallel.mesh import FoldedMesh
from engine.parallel.param_attrs import is_expert, set_reduce_axes
from engine.testing.grads import TrainingGradSync
from engine.testing.multiprocess import run_distributed

from .last_stats import last_stats

HIDDEN, BATCH, SEQ = 16, 4, 8
# fp32 with a different summation order (all-reduce of grads, index_add order): ~1e-6 rel.
RTOL, ATOL = 1e-5, 1e-6

MOE_CONFIGS = {
    "dropless": MoEConfig(num_experts=8, top_k=2, ffn_hidden_size=8, num_shared_experts=1,
                          shared_ffn_hidden_size=8, aux_loss_type="switch", aux_loss_coeff=1e-2,
                          z_loss_coeff=1e-3),
    "drop_probs": MoEConfig(num_experts=8, top_k=2, ffn_hidden_size=8, score_func="sigmoid",
                            aux_loss_type="seq", aux_loss_coeff=1e-2, capacity_factor=1.0,
                            drop_policy="probs"),
    "drop_position_pad": MoEConfig(num_experts=8, top_k=2, ffn_hidden_size=8, pre_softmax=True,
                                   aux_loss_type="switch", capacity_factor=1.25,
                                   drop_policy="position", pad_to_capacity=True),
}


def _build_layer(moe_name: str, zero_router: bool) -> MoELayer:
    torch.manual_seed(1234)
    layer = MoELayer(HIDDEN, MOE_CONFIGS[moe_name])
    with torch.no_grad():
        # A decisive router so that capacity actually drops tokens; a zero router makes
        # every token pick experts 0 and 1 (tie -> lower id), so other EP ranks get none.
        layer.router.weight.copy_(torch.zeros_like(layer.router.weight) if zero_router
                                  else torch.randn_like(layer.router.weight) * 0.5)
        for p in layer.experts.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return layer


def _token_owner(mesh: FoldedMesh) -> tuple[slice, slice, torch.Tensor]:
    """This rank's (batch slice, sequence slice) and the owner rank of every token."""
    owner_bs = torch.empty(BATCH, SEQ, dtype=torch.long)
    mine = None
    for rank in range(mesh.config.world_size):
        coords = mesh.layout.coords(rank)
        b_slice = _chunk(BATCH, mesh.config.dp, coords["dp"])
        s_slice = _chunk(SEQ, mesh.config.tp * mesh.config.cp, coords["tp_cp"])
        owner_bs[b_slice, s_slice] = rank
        if rank == mesh.rank:
            mine = (b_slice, s_slice)
    return mine[0], mine[1], owner_bs


def _chunk(n: int, parts: int, index: int) -> slice:
    size = n // parts
    return slice(index * size, (index + 1) * size)


def _run_case(mesh: FoldedMesh, moe_name: str, dispatcher: str, zero_router: bool) -> dict:
    gen = torch.Generator().manual_seed(99)
    x_bsh = torch.randn(BATCH, SEQ, HIDDEN, generator=gen)
    w_bsh = torch.randn(BATCH, SEQ, HIDDEN, generator=gen)
    b_sl, s_sl, owner_bs = _token_owner(mesh)

    ref = _build_layer(moe_name, zero_router)
    x_ref = x_bsh.clone().requires_grad_(True)
    y_ref = ref(x_ref, token_groups_bs=owner_bs)
    (y_ref * w_bsh).sum().div(BATCH * SEQ).backward()

    layer = _build_layer(moe_name, zero_router)
    parallelize_moe(layer, mesh, dispatcher=dispatcher)
    for p in layer.parameters():
        if not is_expert(p) and mesh.config.tp > 1:
            set_reduce_axes(p, ("dp_cp", "tp"))     # dense params under sequence parallelism
    grad_sync = TrainingGradSync(list(layer.named_parameters()), mesh)
    traffic_before = mesh.traffic.snapshot()
    x_loc = x_bsh[b_sl, s_sl].clone().requires_grad_(True)
    y_loc = layer(x_loc)
    (y_loc * w_bsh[b_sl, s_sl]).sum().div(BATCH * SEQ).backward()
    dispatch_bytes = mesh.traffic.since(traffic_before).get(Axis.ETP_EP, 0)
    grad_sync.finish()
    return _compare(ref, layer, mesh, (y_ref, x_ref), (y_loc, x_loc), (b_sl, s_sl), dispatch_bytes)


def _compare(ref, layer, mesh, ref_out, loc_out, token_slices, dispatch_bytes) -> dict:
    errors, failures = {}, []

    def check(name, actual, expected):
        errors[name] = float((actual - expected).abs().max()) if actual.numel() else 0.0
        try:
            torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL)
        except AssertionError as exc:
            failures.append(f"{name}: {str(exc).splitlines()[:3]}")

    b_sl, s_sl = token_slices
    check("output", loc_out[0].detach(), ref_out[0].detach()[b_sl, s_sl])
    check("input_grad", loc_out[1].grad, ref_out[1].grad[b_sl, s_sl])
    check("router_grad", layer.router.weight.grad, ref.router.weight.grad)
    e_sl, f_sl = expert_slice(ref.cfg.num_experts, ref.cfg.ffn_hidden_size, mesh.config.ep,
                              mesh.rank_in("ep"), mesh.config.etp, mesh.rank_in("etp"))
    for name, index in (("w_gate", (e_sl, slice(None), f_sl)), ("w_up", (e_sl, slice(None), f_sl)),
                        ("w_down", (e_sl, f_sl, slice(None)))):
        check(f"{name}_grad", getattr(layer.experts, name).grad, getattr(ref.experts, name).grad[index])
    if ref.shared_experts is not None:
        for (name, p_loc), p_ref in zip(layer.shared_experts.named_parameters(), ref.shared_experts.parameters()):
            check(f"shared.{name}_grad", p_loc.grad, p_ref.grad)
    for key in ("aux_loss", "z_loss", "dropped_token_fraction"):
        check(key, torch.tensor(last_stats(layer)[key]), torch.tensor(last_stats(ref)[key]))
    check("tokens_per_expert", last_stats(layer)["tokens_per_expert"], last_stats(ref)["tokens_per_expert"])
    return {"errors": errors, "failures": failures, "bytes_sent": dispatch_bytes,
            "ref_dropped": last_stats(ref)["dropped_token_fraction"]}


def _parity_worker(rank, world, cases):
    meshes, results = {}, {}
    for name, layout, moe_name, dispatcher, zero_router in cases:
        key = tuple(sorted(layout.items()))
        if key not in meshes:
            meshes[key] = FoldedMesh(ParallelConfig(world_size=world, **layout))
        results[name] = _run_case(meshes[key], moe_name, dispatcher, zero_router)
    return results


# etp2 (EP=1): expert grads must reduce over edp only, not over dense DP (Megatron PR #1622).
LAYOUTS_2 = {"ep2": dict(ep=2), "tp2_ep2": dict(tp=2, ep=2), "etp2": dict(etp=2)}
LAYOUTS_4 = {"ep4": dict(ep=4), "ep2_edp2": dict(ep=2), "etp2_ep2": dict(etp=2, ep=2),
             "cp2_ep2": dict(cp=2, ep=2), "tp2_etp2_ep2": dict(tp=2, etp=2, ep=2),
             "dp4_local": dict()}


def _cases(layouts: dict) -> list:
    cases = []
    for layout_name, layout in layouts.items():
        has_experts_axes = layout.get("ep", 1) * layout.get("etp", 1) > 1
        for dispatcher in ("alltoall", "allgather") if has_experts_axes else ("local",):
            for moe_name in MOE_CONFIGS:
                cases.append((f"{layout_name}/{dispatcher}/{moe_name}", layout, moe_name, dispatcher, False))
            cases.append((f"{layout_name}/{dispatcher}/zero_tokens", layout, "dropless", dispatcher, True))
    return cases


def _assert_all_match(results: list[dict]) -> None:
    for rank, per_case in enumerate(results):
        for name, out in per_case.items():
            assert not out["failures"], f"rank {rank} case {name}: {out['failures']}"
            if "/drop_" in name:
                assert out["ref_dropped"] > 0, f"{name}: the dropping case dropped nothing"
    worst = {}
    for per_case in results:
        for name, out in per_case.items():
            layout = name.split("/")[0]
            worst[layout] = max(worst.get(layout, 0.0), max(out["errors"].values()))
    print("max abs error per layout:", {k: f"{v:.2e}" for k, v in worst.items()})


# Hand count for ep2/zero_tokens: 16 local tokens x k=2 = 32 rows of h=16 fp32 (64 B); every
# token goes to experts 0, 1 (EP rank 0). all-to-all, per rank: counts row 4 x 8 B = 32, plus
# 32 rows one way in dispatch or combine and 32 rows in the matching backward: 32 + 2 * 2048.
# all-gather (static sizes, no size exchange): x 1024 + token/expert ids 32 x 16 B = 512 + probs
# 128 + reduce-scatter 1024, backward: gather 1024 + probs grad 128 + x grad 1024.
EXPECTED_BYTES_EP2_ZERO_TOKENS = {"alltoall": 32 + 2 * 2048,
                                  "allgather": 1024 + 512 + 128 + 1024 + 1024 + 128 + 1024}


@pytest.mark.slow
def test_moe_layer_parity_world2():
    results = run_distributed(_parity_worker, 2, _cases(LAYOUTS_2), timeout_s=300)
    _assert_all_match(results)
    for dispatcher, expected in EXPECTED_BYTES_EP2_ZERO_TOKENS.items():
        assert [r[f"ep2/{dispatcher}/zero_tokens"]["bytes_sent"] for r in results] == [expected] * 2


@pytest.mark.slow
def test_moe_layer_parity_world4():
    _assert_all_match(run_distributed(_parity_worker, 4, _cases(LAYOUTS_4), timeout_s=400))

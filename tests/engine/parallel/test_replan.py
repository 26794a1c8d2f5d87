"""The re-planning rule: configured layout kept where valid, else the largest divisors of
the configured degrees in the priority pp, tp, cp, etp, ep; model/batch checks respected."""
import pytest

from engine.config.layout_plan import configured_layout, plan_layout
from engine.config.model import get_preset
from engine.config.train import TrainConfig
from engine.parallel.config import LayoutError, ParallelConfig
from engine.parallel.replan import describe, replan


def _degrees(cfg: ParallelConfig) -> dict:
    return {k: getattr(cfg, k) for k in ("tp", "cp", "pp", "ep", "etp", "vpp")}


def test_configured_layout_is_kept_where_it_divides():
    configured = ParallelConfig(world_size=16, tp=2, pp=2, ep=4)
    for world in (8, 16, 24, 32):
        assert _degrees(replan(configured, world)) == dict(tp=2, cp=1, pp=2, ep=4, etp=1, vpp=1)


def test_degrees_shrink_to_divisors_in_priority_order():
    configured = ParallelConfig(world_size=16, tp=2, pp=2, ep=8, vpp=2)
    # 4 ranks: pp2 and tp2 still fit; ep 8 -> 2 (etp*ep*pp = 4).
    assert _degrees(replan(configured, 4)) == dict(tp=2, cp=1, pp=2, ep=2, etp=1, vpp=2)
    # 2 ranks: pp is kept first, so tp and ep give way; vpp stays with pp.
    assert _degrees(replan(configured, 2)) == dict(tp=1, cp=1, pp=2, ep=1, etp=1, vpp=2)
    # 3 ranks: nothing but 1 divides 3 among these degrees; vpp drops with pp.
    assert _degrees(replan(configured, 3)) == dict(tp=1, cp=1, pp=1, ep=1, etp=1, vpp=1)
    assert describe(replan(configured, 4)) == "tp2 cp1 pp2 (vpp2) ep2 etp1 -> dp1 edp1"


def test_check_refuses_candidates_and_no_layout_is_an_error():
    configured = ParallelConfig(world_size=4, ep=4)

    def no_ep4(candidate):
        if candidate.ep == 4:
            raise ValueError("ep=4 refused")

    assert replan(configured, 8, check=no_ep4).ep == 2

    def refuse_all(candidate):
        raise ValueError("nothing fits")

    with pytest.raises(LayoutError, match="no layout for world size 8"):
        replan(configured, 8, check=refuse_all)


def test_plan_layout_applies_model_and_batch_checks():
    model = get_preset("tiny-moe")            # 8 experts, 4 heads, 2 kv heads, 4 layers
    train = TrainConfig(global_batch_size=24, micro_batch_size=1, seq_len=16)
    parallel = dict(tp=2, ep=4)
    assert configured_layout(parallel).world_size == 4
    assert _degrees(plan_layout(parallel, 6, model, train))["tp"] == 2   # ep 4 -> 2 (6 % 4)
    assert plan_layout(parallel, 6, model, train).ep == 2
    # 16 ranks: dp = 8 with tp2 divides the 24 sequences: fits.
    assert plan_layout(parallel, 16, model, train).dp == 8
    # 32 ranks: dp 16 or 32 divides no batch of 24 sequences: no layout, and the error
    # says why the preferred one was refused.
    with pytest.raises(LayoutError, match="world size 32.*tp2 cp1 pp1 .*global_batch_size=24"):
        plan_layout(parallel, 32, model, train)

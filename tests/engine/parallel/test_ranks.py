"""Rank arithmetic of the folded mesh, without any process group."""
import pytest

from engine.parallel.config import LayoutError, ParallelConfig
from engine.parallel.ranks import RankLayout


def worked_example():
    # arXiv 2504.14960 / Megatron-Core: attention TP2 CP2 DP4 PP2, MoE ETP1 EP8 EDP2 PP2.
    return RankLayout(ParallelConfig(world_size=32, tp=2, cp=2, pp=2, ep=8, etp=1))


def test_worked_example_groups():
    layout = worked_example()
    assert layout.config.dp == 4 and layout.config.edp == 2
    assert layout.group_of("tp", 0) == [0, 1]
    assert layout.group_of("cp", 0) == [0, 2]
    assert layout.group_of("dp", 0) == [0, 4, 8, 12]
    assert layout.group_of("tp_cp", 0) == [0, 1, 2, 3]
    assert layout.group_of("ep", 0) == list(range(8))
    assert layout.group_of("edp", 0) == [0, 8]
    assert layout.group_of("pp", 0) == [0, 16]
    assert layout.group_of("dp_cp", 0) == [0, 2, 4, 6, 8, 10, 12, 14]
    assert layout.group_of("etp_ep", 0) == list(range(8))
    assert layout.group_of("stage", 17) == list(range(16, 32))


def test_ep_spans_tp_cp_and_dp():
    layout = worked_example()
    ep = set(layout.group_of("ep", 0))
    assert set(layout.group_of("tp", 0)) < ep and set(layout.group_of("cp", 0)) < ep
    assert len(ep & set(layout.group_of("dp", 0))) == 2


@pytest.mark.parametrize("kw", [
    dict(world_size=32, tp=2, cp=2, pp=2, ep=8, etp=1),
    dict(world_size=8, tp=2, cp=2, pp=2, ep=4, etp=1),
    dict(world_size=8, tp=2, pp=1, ep=2, etp=2),
    dict(world_size=16, tp=1, cp=4, pp=2, ep=2, etp=2),
    dict(world_size=6, tp=1, cp=3, ep=2),
])
def test_groups_partition_world_and_pp_identical(kw):
    layout = RankLayout(ParallelConfig(**kw))
    layout.check_pp_identical()
    world = kw["world_size"]
    for axis, groups in layout.table().items():
        flat = sorted(r for g in groups for r in g)
        assert flat == list(range(world)), axis
    sizes = {"tp": kw.get("tp", 1), "cp": kw.get("cp", 1), "pp": kw.get("pp", 1),
             "ep": kw.get("ep", 1), "etp": kw.get("etp", 1)}
    for axis, size in sizes.items():
        assert all(len(g) == size for g in layout.groups(axis)), axis
    # every rank has a unique (tp, cp, dp, pp) coordinate and a unique (etp, ep, edp, pp) one
    coords = [layout.coords(r) for r in range(world)]
    assert len({(c["tp"], c["cp"], c["dp"], c["pp"]) for c in coords}) == world
    assert len({(c["etp"], c["ep"], c["edp"], c["pp"]) for c in coords}) == world


def test_embedding_groups():
    layout = RankLayout(ParallelConfig(world_size=8, pp=4))
    assert layout.group_of("embed", 0) == [0, 6]
    assert layout.group_of("embed", 1) == [1, 7]
    assert RankLayout(ParallelConfig(world_size=2)).group_of("embed", 1) == [1]


@pytest.mark.parametrize("kw,match", [
    (dict(world_size=4, tp=3), "tp\\*cp\\*pp"),
    (dict(world_size=4, ep=3), "etp\\*ep\\*pp"),
    (dict(world_size=4, tp=0), "parallel.tp=0"),
    (dict(world_size=4, cp_mode="zigzag"), "cp_mode"),
    (dict(world_size=4, cp=4, cp_mode="hybrid", cp_a2a_size=3), "cp_a2a_size"),
])
def test_bad_layouts(kw, match):
    with pytest.raises(LayoutError, match=match):
        ParallelConfig(**kw)


@pytest.mark.parametrize("kw,model,match", [
    (dict(world_size=4, ep=4), dict(num_experts=6), "num_experts=6"),
    (dict(world_size=4, tp=4), dict(num_heads=6), "num_heads=6"),
    (dict(world_size=4, tp=4), dict(num_kv_heads=6, num_heads=8), "num_kv_heads=6"),
    (dict(world_size=4, tp=4), dict(num_kv_heads=3, num_heads=12), "num_kv_heads=3"),
    (dict(world_size=4, pp=4), dict(num_layers=2), "num_layers=2"),
    (dict(world_size=4, cp=4, cp_mode="a2a"), dict(num_heads=6, num_kv_heads=2), "all-to-all"),
])
def test_bad_layouts_for_model(kw, model, match):
    shape = dict(num_heads=8, num_kv_heads=4, num_experts=8, num_layers=4) | model
    with pytest.raises(LayoutError, match=match):
        ParallelConfig(**kw).validate_for_model(**shape)


def test_kv_heads_replicated_when_fewer_than_tp():
    ParallelConfig(world_size=4, tp=4).validate_for_model(
        num_heads=8, num_kv_heads=2, num_experts=4, num_layers=2)


def test_unknown_axis():
    with pytest.raises(KeyError, match="unknown mesh axis"):
        RankLayout(ParallelConfig(world_size=2)).groups("xp")


def test_sub_groups_cut_each_group_into_consecutive_runs():
    layout = RankLayout(ParallelConfig(world_size=8, tp=4))
    assert layout.sub_groups("tp", 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert sorted(layout.sub_groups("dp", 1)) == [[r] for r in range(8)]
    with pytest.raises(ValueError, match="runs of 3"):
        layout.sub_groups("tp", 3)

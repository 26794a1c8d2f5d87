"""The planner's search and ranking (no timings): validity, memory, ordering, filters (the
paper's rows: test_paper_rows.py)."""
from __future__ import annotations

from engine.config.model import get_preset
from engine.planner.cost import Machine, estimate_step
from engine.planner.devices import DEVICES
from engine.planner.memory import estimate_memory
from engine.planner.search import RECOMPUTE_ORDER, SearchSpace, search_layouts, why_no_candidate
from engine.config.train import TrainConfig

H100 = Machine(DEVICES["h100"], gpus_per_node=8)
TINY_TRAIN = TrainConfig(global_batch_size=16, seq_len=128, precision="bf16", zero1=True)


def _tiny_search(limit=None, **space):
    cfg = get_preset("tiny-moe")
    return cfg, search_layouts(cfg, TINY_TRAIN, 8, H100, memory_limit=limit, space=SearchSpace(**space))


def test_rows_are_valid_fit_and_are_sorted():
    cfg, unlimited = _tiny_search()
    limit = sorted(r.memory_bytes for r in unlimited.rows)[len(unlimited.rows) // 2]
    _, result = _tiny_search(limit)
    assert 0 < len(result.rows) <= result.searched
    times = [r.step_time_s for r in result.rows]
    assert times == sorted(times)
    for row in result.rows:
        p = row.parallel
        p.validate_for_model(num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                             num_experts=cfg.moe.num_experts, num_layers=cfg.num_layers,
                             vocab_size=cfg.vocab_size)
        train = TrainConfig(**{**TINY_TRAIN.__dict__, "micro_batch_size": row.micro_batch_size,
                               "recompute": row.recompute})
        # the memory of a row is exactly what `foldmoe validate` predicts for that config
        assert row.memory_bytes == estimate_memory(cfg, p, train, worst_case=False).peak.total <= limit
        assert row.step_time_s == estimate_step(cfg, p, train, H100).step_time_s
        if p.vpp > 1:
            assert train.num_microbatches(p.dp) % p.pp == 0      # interleaving needs whole rounds


def test_keeps_only_the_cheapest_recompute_that_fits():
    cfg, unlimited = _tiny_search()
    assert {r.recompute for r in unlimited.rows} == {"none"}     # everything fits: no recompute
    keys = [(tuple(r.degrees().values()), r.micro_batch_size) for r in unlimited.rows]
    assert len(keys) == len(set(keys))
    tight = min(r.memory_bytes for r in unlimited.rows) * 0.9
    _, result = _tiny_search(tight)
    for row in result.rows:     # every cheaper mode of the same layout exceeds the limit
        for cheaper in RECOMPUTE_ORDER[:RECOMPUTE_ORDER.index(row.recompute)]:
            train = TrainConfig(**{**TINY_TRAIN.__dict__, "micro_batch_size": row.micro_batch_size,
                                   "recompute": cheaper})
            assert estimate_memory(cfg, row.parallel, train, worst_case=False).peak.total > tight


def test_only_filters_degrees_micro_batch_and_recompute():
    _, result = _tiny_search(only={"tp": "2", "ep": "4", "micro_batch_size": "1", "recompute": "full"})
    assert result.rows
    assert all(r.parallel.tp == 2 and r.parallel.ep == 4 and r.micro_batch_size == 1
               and r.recompute == "full" for r in result.rows)


def test_search_is_deterministic():
    _, a = _tiny_search()
    _, b = _tiny_search()
    assert [r.as_dict() for r in a.rows] == [r.as_dict() for r in b.rows]


def test_pipeline_p2p_term_follows_the_schedule_simulation():
    # The planner's exposed PP p2p equals what engine/pipeline/verify.simulate adds to the
    # step when every exchange takes one transfer: interleaved (the executor overlaps the
    # steady state) and 1F1B (it waits for every transfer).
    from engine.parallel.config import ParallelConfig
    from engine.pipeline.schedules import build_schedule
    from engine.pipeline.verify import simulate
    from engine.planner.cost import _p2p_transfer

    cfg = get_preset("qwen2-57b-a14b", moe_capacity_factor=1.0)
    train = TrainConfig(global_batch_size=256, seq_len=4096, precision="bf16", zero1=True)
    for vpp, schedule in ((7, "interleaved"), (1, "1f1b")):
        p = ParallelConfig(world_size=64, tp=2, pp=4, ep=4, vpp=vpp)
        m = train.num_microbatches(p.dp)
        one = _p2p_transfer(p, train, cfg, H100)
        programs = build_schedule(schedule, p.pp, m, vpp)
        cost = lambda a: (1.0 if a.kind == "F" else 2.0) / vpp
        span = lambda tau: max(t.end for tl in simulate(programs, cost, tau) for t in tl)
        tau = 1e-3 / vpp
        simulated = (span(tau) - span(0.0)) / tau * one
        planned = estimate_step(cfg, p, train, H100).breakdown["pp"]
        if schedule == "interleaved":
            assert abs(planned - simulated) <= 1e-9 * simulated, (planned, simulated)
        else:   # 1F1B: 2 m per step, plus what the fill adds in the simulation (pp - 1 or so)
            assert 2 * m * one == planned and planned <= simulated <= planned + 2 * p.pp * one


def test_overlapped_param_gather_hides_behind_the_first_chunk_forwards():
    from dataclasses import replace

    from engine.parallel.config import ParallelConfig
    from engine.planner.cost import _gather_behind_forward

    p = ParallelConfig(world_size=8, pp=4, vpp=2)
    # chunk 0: half the gather (5) after 1 chunk forward; chunk 1: all of it (10) after 4 + 1
    assert _gather_behind_forward(10.0, 0, p, 1.0) == 5.0
    assert _gather_behind_forward(10.0, 3, p, 1.0) == 2.0     # rank 3: 10 - (4 + 3 + 1)
    assert _gather_behind_forward(1.0, 0, p, 1.0) == 0.0
    cfg = get_preset("qwen2-57b-a14b", moe_capacity_factor=1.0)
    train = TrainConfig(global_batch_size=256, seq_len=4096, precision="bf16", zero1=True,
                        overlap_grad_reduce=True)
    layout = ParallelConfig(world_size=64, tp=2, pp=4, ep=4, vpp=7)
    blocking = estimate_step(cfg, layout, train, H100).breakdown["dp"]
    overlapped = estimate_step(cfg, layout, replace(train, overlap_param_gather=True), H100).breakdown["dp"]
    assert 0 < overlapped < blocking


def test_an_empty_search_names_the_rule_or_filter_that_left_nothing():
    cfg = get_preset("tiny-moe")
    why = lambda world, **space: why_no_candidate(cfg, TINY_TRAIN, world, SearchSpace(**space))  # noqa: E731
    # 7 ranks: no degree divides 7 but dp = 7, which does not divide the global batch of 16
    assert why(7).startswith("no folded layout of 7 ranks is valid: each degree must divide")
    assert search_layouts(cfg, TINY_TRAIN, 7, H100, memory_limit=None).rows == []
    assert why(8, only={"tp": "3"}) == "no valid layout of 8 ranks has tp=3 (values valid layouts have: tp in [1, 2, 4])"
    assert why(8, only={"recompute": "most"}).endswith("none matches the filter")
    # every layout of 8 ranks has dp >= 1 and 16 % (dp x 32) != 0 for a micro-batch of 32
    assert why(8, micro_batch_sizes=(32,)).startswith("train.global_batch_size=16 is not a whole number")
    # candidates there, filtered by memory only: the caller's memory line applies
    assert why(8) is None and search_layouts(cfg, TINY_TRAIN, 8, H100, memory_limit=1).rows == []


def test_a_cp_flavour_keeps_the_layouts_without_cp():
    # hybrid with an all-to-all of 2 cannot describe cp = 1; those layouts run no CP at all
    cfg = get_preset("tiny-moe")
    hybrid = search_layouts(cfg, TINY_TRAIN, 8, H100, memory_limit=None,
                            options={"cp_mode": "hybrid", "cp_a2a_size": 2}).rows
    ring = search_layouts(cfg, TINY_TRAIN, 8, H100, memory_limit=None).rows
    by_cp = {cp: {r.parallel.cp_mode for r in hybrid if r.parallel.cp == cp} for cp in (1, 2, 4)}
    assert by_cp == {1: {"ring"}, 2: {"hybrid"}, 4: {"hybrid"}}
    no_cp = lambda rows: sorted((repr(r.parallel), r.micro_batch_size, r.step_time_s)   # noqa: E731
                                for r in rows if r.parallel.cp == 1)
    assert no_cp(hybrid) == no_cp(ring)

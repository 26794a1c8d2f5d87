"""The planner against the paper's rows (arXiv 2504.14960: H100, 989.5 TFLOP/s bf16, NVLink
450 GB/s, 400 Gb/s network, capacity factor 1, GBS 256, seq 4096), with the one set of
default constants (CostConstants()) for both models. What holds and what does not, and
why, is in docs/planner.md ("Against the paper")."""
from __future__ import annotations

from functools import lru_cache

import pytest

from engine.config.model import get_preset
from engine.config.train import TrainConfig
from engine.planner.cost import Machine
from engine.planner.devices import DEVICES
from engine.planner.memory import estimate_memory
from engine.planner.search import search_layouts
from engine.parallel.config import ParallelConfig

H100 = Machine(DEVICES["h100"], gpus_per_node=8)
PAPER_TRAIN = TrainConfig(global_batch_size=256, seq_len=4096, precision="bf16", zero1=True,
                          overlap_grad_reduce=True)
MIXTRAL = ("mixtral-8x22b", 128, 0.493, {"tp": 2, "pp": 8, "ep": 8, "etp": 1})
QWEN2 = ("qwen2-57b-a14b", 64, 0.390, {"tp": 2, "pp": 4, "ep": 4, "etp": 1})


@lru_cache(maxsize=None)
def _rows(preset: str, world: int):
    cfg = get_preset(preset, moe_capacity_factor=1.0)
    return search_layouts(cfg, PAPER_TRAIN, world, H100, memory_limit=DEVICES["h100"].memory_bytes).rows


def _first(rows, degrees: dict):
    """(rank, row) of the fastest row with the paper's degrees."""
    for rank, row in enumerate(rows):
        if all(getattr(row.parallel, k) == v for k, v in degrees.items()):
            return rank, row
    raise AssertionError(f"{degrees} not among {len(rows)} feasible layouts")


@pytest.mark.parametrize("preset,world,paper_mfu,degrees", [MIXTRAL, QWEN2])
def test_best_predicted_mfu_is_the_papers_within_5_points(preset, world, paper_mfu, degrees):
    rows = _rows(preset, world)
    assert abs(rows[0].mfu - paper_mfu) <= 0.05, rows[0].as_dict()


def test_mixtral_paper_layout_fits_without_recompute():
    # TP2 CP1 PP8 EP8 (DP8): stage 0 keeps 8 micro-batches of 7 layers. It fits 80 GB since
    # the experts keep 2 [rows, F] tensors instead of 4 and the combine keeps its rows in bf16
    # (93.3 GB before; docs/planner.md).
    cfg = get_preset("mixtral-8x22b", moe_capacity_factor=1.0)
    p = ParallelConfig(world_size=128, tp=2, pp=8, ep=8)
    assert estimate_memory(cfg, p, PAPER_TRAIN, worst_case=False).peak.total < DEVICES["h100"].memory_bytes
    rank, row = _first(_rows(*MIXTRAL[:2]), {**MIXTRAL[3], "cp": 1})
    assert row.recompute == "none", row.as_dict()


def test_mixtral_paper_layout_with_cp1_in_the_top_3():
    rank, row = _first(_rows(*MIXTRAL[:2]), {**MIXTRAL[3], "cp": 1})
    assert rank < 3 and abs(row.mfu - MIXTRAL[2]) <= 0.05, (rank, row.as_dict())


def test_qwen2_paper_layout_mfu_within_5_points():
    rank, row = _first(_rows(*QWEN2[:2]), {**QWEN2[3], "cp": 1})
    assert abs(row.mfu - QWEN2[2]) <= 0.05, (rank, row.as_dict())


@pytest.mark.xfail(strict=True, reason="rank 8 of 3,792: PP4 VPP7 puts one layer in every chunk, so the "
                                       "last stage also carries the 151,936-vocabulary head (17% slower); "
                                       "PP2 VPP14 (head amortised), EP8 (larger expert GEMMs, half the expert "
                                       "gradients) and TP1 CP2 (no exposed TP collectives) predict faster "
                                       "(docs/planner.md)")
def test_qwen2_paper_layout_in_the_top_3():
    rank, row = _first(_rows(*QWEN2[:2]), {**QWEN2[3], "cp": 1})
    assert rank < 3, (rank, row.as_dict())

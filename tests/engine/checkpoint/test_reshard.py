"""ReshardReader on hand-made two-rank checkpoints: coverage from slices, box and flat-range
reads, replica choice, which files are opened, SHA-256 and missing-element errors."""
import threading

import pytest
import torch

from engine.checkpoint import CheckpointError, CheckpointManager
from engine.checkpoint.reshard import ReshardReader, coverage_of
from engine.parallel.param_attrs import apply_slices

GLOBAL = torch.arange(48, dtype=torch.float32).view(6, 8) * 0.5
# Rank r holds rows [3r, 3r+3) (a TP/EP-like split), the flat moments of half of that shard
# (ZeRO-1 style ranges of the local tensor), and a replicated buffer.
ROWS = {0: [[0, 0, 3]], 1: [[0, 3, 3]]}
FLAT = {0: (0, 12), 1: (12, 24)}


def _state(rank: int) -> dict:
    local = apply_slices(GLOBAL, [tuple(s) for s in ROWS[rank]])
    moments = (local * 10).flatten()
    tensors = {"model/w": local, "optim/m/w": moments[FLAT[rank][0]:FLAT[rank][1]],
               "model/bias": torch.ones(8)}
    shards = {"model/w": {"local_shape": [3, 8], "slices": ROWS[rank]},
              "optim/m/w": {"local_shape": [3, 8], "slices": ROWS[rank],
                            "flat_range": list(FLAT[rank])},
              "model/bias": {"local_shape": [8], "slices": []}}
    return {"tensors": tensors, "shards": shards, "meta": {"step": 7, "layout": {"w": 2}}}


@pytest.fixture
def ckpt(tmp_path):
    barrier = threading.Barrier(2)
    paths = {}

    def save(rank):
        manager = CheckpointManager(str(tmp_path), keep=0, rank=rank, world_size=2,
                                    barrier=barrier.wait)
        paths[rank] = manager.save(7, _state(rank))

    threads = [threading.Thread(target=save, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return paths[0]


def test_coverage_composes_narrow_and_index():
    cov = coverage_of([[0, 2, 4], [0, [1, 3], None]], (2, 5))
    assert cov[0].tolist() == [3, 5] and cov[1].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(CheckpointError, match="do not give local shape"):
        coverage_of([[0, 0, 3]], (2, 5))


def test_column_shard_reads_both_row_shards(ckpt):
    reader = ReshardReader(ckpt, rank=1)
    cols = [[1, 4, 4]]
    out = torch.empty(6, 4)
    reader.fill_("model/w", out, cols, (6, 4))
    assert torch.equal(out, GLOBAL[:, 4:])
    assert reader.files_read == {"rank00000.safetensors", "rank00001.safetensors"}


def test_index_slices_and_flat_ranges(ckpt):
    reader = ReshardReader(ckpt, rank=0)
    picked = [[0, [4, 1], None], [1, 2, 3]]          # rows 4 and 1 (in that order), cols 2..4
    out = torch.empty(2, 3)
    reader.fill_("model/w", out, picked, (2, 3))
    assert torch.equal(out, GLOBAL[[4, 1]][:, 2:5])
    # A ZeRO-1 range [2, 5) of the flattened local [2, 3] tensor, from the saved flat ranges.
    moments = torch.empty(3)
    reader.fill_("optim/m/w", moments, picked, (2, 3), (2, 5))
    assert torch.equal(moments, (GLOBAL[[4, 1]][:, 2:5] * 10).flatten()[2:5])
    # A range inside one row: global row 1, cols 0..2 (in saved rank 0's flat range [0, 12)).
    second_row = torch.empty(3)
    reader.fill_("optim/m/w", second_row, [[0, [4, 1], None], [1, 0, 3]], (2, 3), (3, 6))
    assert torch.equal(second_row, GLOBAL[1, 0:3] * 10)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu_checks.sh runs it)"))]


@pytest.mark.parametrize("device", DEVICES)
def test_both_read_paths_fill_a_tensor_on_the_model_device(ckpt, device):
    # Optimizer state lives on the GPU: the element path (index_put_) must move the host's
    # values there; the box path (copy_) crosses devices by itself.
    reader = ReshardReader(ckpt, rank=0)
    picked = [[0, [4, 1], None], [1, 2, 3]]
    out = torch.empty(2, 3, device=device)
    reader.fill_("model/w", out, picked, (2, 3))
    moments = torch.empty(3, device=device)
    reader.fill_("optim/m/w", moments, picked, (2, 3), (2, 5))
    assert out.device.type == moments.device.type == device
    assert torch.equal(out.cpu(), GLOBAL[[4, 1]][:, 2:5])
    assert torch.equal(moments.cpu(), (GLOBAL[[4, 1]][:, 2:5] * 10).flatten()[2:5])


def test_unchanged_layout_reads_only_its_own_file(ckpt):
    for rank in (0, 1):
        reader = ReshardReader(ckpt, rank=rank)
        out, bias = torch.empty(3, 8), torch.empty(8)
        reader.fill_("model/w", out, ROWS[rank], (3, 8))
        reader.fill_("model/bias", bias, [], (8,))      # replicated: this rank's own copy
        assert torch.equal(out, GLOBAL[3 * rank:3 * rank + 3]) and torch.equal(bias, torch.ones(8))
        assert reader.files_read == {f"rank{rank:05d}.safetensors"}


def test_corrupt_file_fails_only_when_needed(ckpt):
    with open(f"{ckpt}/rank00001.safetensors", "r+b") as handle:
        handle.seek(-1, 2)
        handle.write(b"\x7f")
    reader = ReshardReader(ckpt, rank=0)
    reader.fill_("model/w", torch.empty(3, 8), ROWS[0], (3, 8))   # needs rank 0's file only
    with pytest.raises(CheckpointError, match="SHA-256 mismatch"):
        reader.fill_("model/w", torch.empty(6, 4), [[1, 0, 4]], (6, 4))


def test_elements_no_shard_holds_are_an_error(ckpt):
    reader = ReshardReader(ckpt, rank=0)
    with pytest.raises(CheckpointError, match="no saved shard provides 8 of 56"):
        reader.fill_("model/w", torch.empty(7, 8), [], (7, 8))     # a bigger model
    with pytest.raises(CheckpointError, match="has no tensor 'model/other'"):
        reader.fill_("model/other", torch.empty(2), [], (2,))


def test_coverage_is_built_only_for_what_a_rank_reads(ckpt):
    # At 1,024 saved ranks an index of every entry's coverage cost each rank gigabytes
    # (benchmarks/reshard_index.py: 3.4 GB at 128 ranks of Mixtral-8x22B, now 20 MB).
    reader = ReshardReader(ckpt, rank=0)
    assert reader._coverage == {}
    reader.fill_("model/bias", torch.empty(8), [], (8,))
    assert len(reader._coverage) == 1          # the one replica group of the bias

"""This rank's micro-batches from the global batch: pure logic, no process group."""
import pytest
import torch

from engine.parallel.config import ParallelConfig
from engine.parallel.mesh import FoldedMesh
from engine.train.batch import split_microbatches


def _mesh(rank, **kw):
    return FoldedMesh(ParallelConfig(**kw), rank=rank, create_groups=False)


def test_global_microbatches_are_the_same_sequences_for_any_dp():
    tokens = torch.arange(8 * 9).view(8, 9)
    single = split_microbatches(tokens, _mesh(0, world_size=1), 4, 2, torch.device("cpu"))
    for m in range(2):
        rows = torch.cat([split_microbatches(tokens, _mesh(r, world_size=2), 2, 2,
                                             torch.device("cpu"))[m].inputs for r in range(2)])
        torch.testing.assert_close(rows, single[m].inputs)


def test_cp_ranks_hold_zigzag_chunks_with_true_positions():
    tokens = torch.arange(17).view(1, 17)
    got = [split_microbatches(tokens, _mesh(r, world_size=2, cp=2), 1, 1, torch.device("cpu"))[0]
           for r in range(2)]
    assert got[0].positions.tolist() == [[0, 1, 2, 3, 12, 13, 14, 15]]
    assert got[1].positions.tolist() == [[4, 5, 6, 7, 8, 9, 10, 11]]
    for mb in got:   # labels are the next token of each input at its true position
        torch.testing.assert_close(mb.labels, mb.inputs + 1)


def test_wrong_global_batch_shape_is_refused():
    with pytest.raises(ValueError, match="expected \\[8, seq_len \\+ 1\\]"):
        split_microbatches(torch.zeros(4, 9, dtype=torch.long), _mesh(0, world_size=1), 4, 2,
                           torch.device("cpu"))

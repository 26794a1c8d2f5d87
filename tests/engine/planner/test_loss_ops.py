"""The cost model's operator count of the chunked LM loss (engine/planner/cost.py,
LOSS_OPS_PER_SLICE) against the engine's (engine/tensor_parallel/cross_entropy.py),
counted with a dispatch mode: every row slice after the first adds that many aten
operators, forward + backward."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import engine.tensor_parallel.cross_entropy as ce
from engine.planner.cost import LOSS_OPS_PER_SLICE


class _OpCount(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _ops(monkeypatch, slices: int, rows: int = 24, vocab: int = 50) -> int:
    monkeypatch.setattr(ce, "CPU_ROW_CHUNK_ELEMS", rows // slices * vocab)
    logits = torch.randn(1, rows, vocab, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, vocab, (1, rows))
    with _OpCount() as ops:
        ce.vocab_parallel_cross_entropy(logits, labels, None).sum().backward()
    return ops.count


def test_operators_per_slice_are_the_engines(monkeypatch):
    one, two, four, eight = (_ops(monkeypatch, n) for n in (1, 2, 4, 8))
    assert eight - four == 4 * LOSS_OPS_PER_SLICE, (four, eight)
    assert four - two == 2 * LOSS_OPS_PER_SLICE, (two, four)
    assert two - one == LOSS_OPS_PER_SLICE, (one, two)

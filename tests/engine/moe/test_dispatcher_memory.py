"""The all-to-all dispatcher lets go of every [rows, h] tensor that autograd does not keep
as soon as it is used: when the experts run, the only such tensor alive is their input
(the received rows in expert order); the received rows in arrival order are already freed.
At the ETP reduce-scatter, the layer's peak, this is two [rows, h] fewer than holding them
(measured in docs/performance.md, "Memory model vs the real Trainer")."""
import pytest
import torch

from engine.moe.assignment import build_assignments
from engine.moe.dispatcher_alltoall import AllToAllDispatcher
from engine.moe.experts import GroupedExperts
from engine.testing.memory_probe import LiveStorageTracker
from engine.testing.multiprocess import run_distributed

TOKENS, HIDDEN, FFN, EXPERTS, TOP_K = 64, 32, 16, 4, 2


class ShapeTracker(LiveStorageTracker):
    """LiveStorageTracker that also remembers each live storage's first tensor shape."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: dict[int, tuple] = {}

    def _track(self, tensor: torch.Tensor) -> None:
        self.shapes.setdefault(id(tensor.untyped_storage()), tuple(tensor.shape))
        super()._track(tensor)

    def live_shapes(self) -> list[tuple]:
        return [self.shapes[key] for key in self._live]


class WatchedExperts(GroupedExperts):
    """Records the [rows, h] storages alive (created under the tracker) when it is called."""

    def __init__(self, tracker: ShapeTracker):
        super().__init__(EXPERTS, HIDDEN, FFN)
        self.tracker, self.rows_alive = tracker, None

    def forward(self, x_nh, counts_e, **kwargs):
        self.rows_alive = sum(shape == tuple(x_nh.shape) for shape in self.tracker.live_shapes())
        return super().forward(x_nh, counts_e, **kwargs)


def _forward(rank, world):
    torch.manual_seed(0)
    x_th = torch.randn(TOKENS, HIDDEN, requires_grad=True)
    probs_tk, experts_tk = torch.rand(TOKENS, TOP_K), torch.randint(0, EXPERTS, (TOKENS, TOP_K))
    tracker = ShapeTracker()
    experts = WatchedExperts(tracker)
    dispatcher = AllToAllDispatcher(EXPERTS, ep_group=None)   # the world-1 default group
    with tracker:
        assign = build_assignments(probs_tk, experts_tk, EXPERTS)
        y_th = dispatcher(x_th, assign, experts)
    y_th.sum().backward()
    return {"rows_alive": experts.rows_alive, "grad_finite": bool(x_th.grad.isfinite().all())}


@pytest.mark.slow
def test_received_rows_are_freed_before_the_experts_run():
    (out,) = run_distributed(_forward, 1, timeout_s=120)
    assert out["grad_finite"]
    assert out["rows_alive"] == 1, out      # the experts' own input; was 2 (the unsorted rows too)

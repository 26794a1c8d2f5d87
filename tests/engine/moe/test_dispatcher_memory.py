"""The dispatchers let go of every [rows, h] tensor that autograd does not keep as soon as
it is used. All-to-all: when the experts run, the only such tensor alive is their input
(the received rows in expert order); the received rows in arrival order are already freed.
At the ETP reduce-scatter, the layer's peak, this is two [rows, h] fewer than holding them
(measured in docs/performance.md, "Memory model vs the real Trainer"). All-gather: the
gathered tokens are freed once permuted, before the experts run."""
import torch
import torch.distributed as dist

from engine.moe.assignment import build_assignments
from engine.moe.dispatcher_allgather import AllGatherDispatcher
from engine.moe.dispatcher_alltoall import AllToAllDispatcher
from engine.moe.experts import GroupedExperts
from engine.testing.memory_probe import LiveStorageTracker

TOKENS, HIDDEN, FFN, EXPERTS, TOP_K = 64, 32, 16, 4, 2


class ShapeTracker(LiveStorageTracker):
    """LiveStorageTracker that also remembers each live storage's first tensor shape."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: dict[int, tuple] = {}

    def _track(self, tensor: torch.Tensor) -> None:
        key = id(tensor.untyped_storage())      # ids are reused once a storage is freed
        if key not in self._live:
            self.shapes[key] = tuple(tensor.shape)
        super()._track(tensor)

    def live_shapes(self) -> list[tuple]:
        return [self.shapes[key] for key in self._live]


class WatchedExperts(GroupedExperts):
    """Records the shapes of the storages alive (created under the tracker) when it is called."""

    def __init__(self, tracker: ShapeTracker):
        super().__init__(EXPERTS, HIDDEN, FFN)
        self.tracker, self.alive, self.input_shape = tracker, [], None

    def forward(self, x_nh, counts_e, **kwargs):
        self.alive, self.input_shape = self.tracker.live_shapes(), tuple(x_nh.shape)
        return super().forward(x_nh, counts_e, **kwargs)


def _one_rank_all_to_all(out, x, output_split_sizes=None, input_split_sizes=None, group=None):
    """all_to_all_single over a group of one (a copy): no gloo worker thread that could hold
    a buffer past the call, so which tensors are alive is deterministic."""
    out.copy_(x)


def _one_rank_all_gather(out, x, group=None):
    out.copy_(x)


def _run(monkeypatch, dispatcher) -> WatchedExperts:
    monkeypatch.setattr(dist, "all_to_all_single", _one_rank_all_to_all)
    monkeypatch.setattr(dist, "all_gather_into_tensor", _one_rank_all_gather)
    torch.manual_seed(0)
    x_th = torch.randn(TOKENS, HIDDEN, requires_grad=True)
    probs_tk, experts_tk = torch.rand(TOKENS, TOP_K), torch.randint(0, EXPERTS, (TOKENS, TOP_K))
    tracker = ShapeTracker()
    experts = WatchedExperts(tracker)
    with tracker:
        y_th = dispatcher(x_th, build_assignments(probs_tk, experts_tk, EXPERTS), experts)
    y_th.sum().backward()
    assert x_th.grad.isfinite().all() and x_th.grad.abs().sum() > 0
    return experts


def test_all_to_all_frees_the_received_rows_before_the_experts_run(monkeypatch):
    experts = _run(monkeypatch, AllToAllDispatcher(EXPERTS, ep_group=None))   # one rank
    assert experts.input_shape == (TOKENS * TOP_K, HIDDEN)
    # the experts' own input; was 2 (the unsorted received rows too)
    assert experts.alive.count(experts.input_shape) == 1, experts.alive


def test_all_gather_frees_the_gathered_tokens_before_the_experts_run(monkeypatch):
    experts = _run(monkeypatch, AllGatherDispatcher(EXPERTS, dispatch_group=None, ep_group=None))
    assert experts.alive.count((TOKENS, HIDDEN)) == 0, experts.alive    # was 1: the gathered tokens

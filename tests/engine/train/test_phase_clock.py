"""PhaseClock on CPU: each phase is the time since the previous mark, in mark order."""
import time

import torch

from engine.train.phase_clock import PhaseClock


def test_phases_partition_the_step():
    clock = PhaseClock(torch.device("cpu"))
    start = time.perf_counter()
    clock.start()
    time.sleep(0.02)
    clock.mark("data")
    time.sleep(0.05)
    clock.mark("forward_backward")
    total = time.perf_counter() - start
    seconds = clock.seconds()
    assert list(seconds) == ["data", "forward_backward"]
    assert 0.02 <= seconds["data"] < seconds["forward_backward"]
    assert sum(seconds.values()) <= total

"""workers/preemption.py without a process group: what makes a rank vote, and the grace
watchdog that ends a rank whose preemption save cannot finish."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from workers.preemption import EXIT_PREEMPTED, PreemptionWatch, write_request

from ..orchestrator.jobs import ROOT


def test_sigterm_sets_the_vote_and_restore_puts_the_old_handler_back(tmp_path):
    previous = signal.getsignal(signal.SIGTERM)
    watch = PreemptionWatch(str(tmp_path), rank=1, grace_s=600).install()
    try:
        assert watch.installed and not watch.requested()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)                         # the handler runs between bytecodes
        assert watch.requested() and watch.signaled_at is not None
    finally:
        watch.restore()                          # also cancels the watchdog
    assert signal.getsignal(signal.SIGTERM) is previous


def test_only_rank_0_reads_the_drivers_request_file(tmp_path):
    rank0 = PreemptionWatch(str(tmp_path), rank=0, grace_s=25)
    rank1 = PreemptionWatch(str(tmp_path), rank=1, grace_s=25)
    assert not rank0.requested() and not rank1.requested()
    write_request(str(tmp_path), "the driver is stopping")
    time.sleep(0.25)                             # past rank 0's poll interval
    assert rank0.requested() and not rank1.requested()


def test_a_rank_that_cannot_finish_within_the_grace_exits_143():
    child = textwrap.dedent("""
        import os, signal, time
        from workers.preemption import PreemptionWatch
        PreemptionWatch("/nonexistent", rank=0, grace_s=0.5).install()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)                           # a save stuck on a dead peer
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", child], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == EXIT_PREEMPTED, out.stderr
    assert time.monotonic() - start < 20
    assert "did not finish within 0.5s" in out.stderr

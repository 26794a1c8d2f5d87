"""The driver's signals: SIGTERM/SIGINT (`ray job stop`, Ctrl-C, a deleted RayJob) become a
flag the driver loop checks, so the job ends with its summary and a non-zero exit."""
from __future__ import annotations

import signal
import threading


class StopSignal:
    """SIGTERM/SIGINT set a flag that the driver loop checks every POLL_INTERVAL_S."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        """Call again after ray.init(), which replaces the SIGTERM handler with sys.exit."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous = signal.signal(sig, self._handle)
            self._previous.setdefault(sig, previous)

    def _handle(self, signum, _frame) -> None:
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def signal_of(err: BaseException) -> int | None:
    """A signal that arrived as an exception: Ctrl-C, or SIGTERM while Ray's own handler
    (sys.exit(15), installed by ray.init) was still in place."""
    if isinstance(err, KeyboardInterrupt):
        return signal.SIGINT
    if isinstance(err, SystemExit):
        return signal.SIGTERM
    return None

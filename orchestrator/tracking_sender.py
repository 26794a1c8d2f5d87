"""Tracking calls on a thread of their own, so an unreachable MLflow store never stalls the
driver's loop (its watchdog, signal handling and progress). With MLflow's default HTTP
retries one failed call takes about 4 minutes, and the driver makes one per step.

Calls run in submission order. A call that fails because the store cannot be reached
(`transient`: a network error, a timeout, HTTP 429 or 5xx, a locked SQLite file) is retried
every `retry_s` until it succeeds, the later ones waiting behind it: nothing is reordered or
dropped while fewer than `max_pending` wait (then the oldest go first, counted in the
warning). One warning when the store becomes unreachable, one when it is back. A call the
store refuses (a bad value, HTTP 4xx) would fail the same way again: it is dropped with a
warning naming it, so it cannot hold the others back.
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Callable

RETRY_S = 30.0
MAX_PENDING = 100_000     # about a day of steps at one per second


class BackgroundSender:
    def __init__(self, warn: Callable[[str], None], retry_s: float = RETRY_S,
                 max_pending: int = MAX_PENDING):
        self._warn, self.retry_s, self.max_pending = warn, retry_s, max_pending
        self._pending: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._closing = False
        self._busy = False
        self.dropped = 0
        self._down_since: float | None = None
        self._retry_now = threading.Event()      # flush() and close() end a retry wait
        self._thread = threading.Thread(target=self._run, name="mlflow-sender", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable, *args, **kwargs) -> None:
        with self._cv:
            if len(self._pending) >= self.max_pending:
                self._pending.popleft()
                self.dropped += 1
            self._pending.append((fn, args, kwargs))
            self._cv.notify_all()

    def flush(self, timeout_s: float) -> bool:
        """Waits until every submitted call has run; False if some still wait at the deadline."""
        deadline = time.monotonic() + timeout_s
        self._retry_now.set()           # an outage's retry wait ends at once: try now
        with self._cv:
            while self._pending or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(min(left, 0.1))
        return True

    def close(self, timeout_s: float) -> int:
        """flush(timeout_s), then stop; returns the number of calls never delivered."""
        self.flush(timeout_s)
        with self._cv:
            self._closing = True
            self._cv.notify_all()
            undelivered = len(self._pending) + (1 if self._busy else 0)
        self._retry_now.set()
        return undelivered

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._closing:
                    self._cv.wait()
                if self._closing:
                    return
                fn, args, kwargs = self._pending[0]
                self._busy = True
            ok = self._call(fn, args, kwargs)
            with self._cv:
                self._busy = False
                if ok:
                    self._pending.popleft()
                self._cv.notify_all()
            if not ok:
                self._retry_now.wait(self.retry_s)
                self._retry_now.clear()

    def _call(self, fn, args, kwargs) -> bool:
        try:
            fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - tracking must not kill training
            if not transient(err):
                self._warn(f"warning: MLflow refused {getattr(fn, '__name__', fn)} "
                           f"({type(err).__name__}: {err}); that value is not logged")
                return True
            if self._down_since is None:
                self._down_since = time.monotonic()
                self._warn(f"warning: MLflow logging failed ({type(err).__name__}: {err}); training "
                           f"continues, and the calls wait and are retried every {self.retry_s:g} s")
            return False
        if self._down_since is not None:
            waited = time.monotonic() - self._down_since
            self._down_since = None
            lost = f"; {self.dropped} oldest step records were dropped" if self.dropped else ""
            self._warn(f"MLflow logging resumed after {waited:.0f} s; the waiting calls are "
                       f"delivered in order{lost}")
        return True


def transient(err: BaseException) -> bool:
    """Whether `err` says the store could not be reached (worth retrying), not that it
    refused the call. MLflow raises its own exceptions with an HTTP status: a dead server's
    exhausted retries and store errors are 500, a refused value 400."""
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    names = {klass.__name__ for klass in type(err).__mro__}
    if names & {"RequestException", "URLError", "OperationalError"}:
        return True                 # requests / urllib, SQLAlchemy (a locked or busy database)
    status = getattr(err, "get_http_status_code", lambda: None)()
    return isinstance(status, int) and (status >= 500 or status == 429)

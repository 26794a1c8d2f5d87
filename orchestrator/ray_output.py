"""Keeps Ray's own output off the driver's progress display: while the job runs, Ray's log
lines go to `<job_dir>/ray.log`, and the driver summarises only its errors.

Three channels reach a Ray driver's terminal: Ray's Python loggers (the `ray` logger tree,
handlers made at import and by ray.init/Ray Train), the C++ core worker writing straight
to file descriptor 2, and worker output forwarded by `log_to_driver` (the launcher turns
that off; workers' logs stay in Ray's session log dir). Only moving descriptor 2 catches
the C++ lines, so it is pointed at the log file for the duration; Python `warnings` land
there too. foldmoe's own messages use `terminal_stderr`, a stream on the saved terminal.
"""
from __future__ import annotations

import logging
import os
import re
import sys

# Python logging ("...\tERROR file.py:12 -- ..."), glog-style C++ lines ("[... E 123 456] ..."),
# tracebacks and exception lines.
_ERROR_LINE = re.compile(r"\bERROR\b|^\[[^\]]* E \d+ \d+\]|^Traceback |^\w+(\.\w+)*(Error|Exception): ")


def _set_stream(handler: logging.StreamHandler, stream):
    """handler.setStream, except that an old stream already closed is not flushed (it would
    raise ValueError); returns the old stream."""
    old = handler.stream
    if getattr(old, "closed", False):
        handler.stream = stream
        return old
    return handler.setStream(stream)


class RayOutputCapture:
    def __init__(self, log_path: str):
        self.log_path = log_path
        self.terminal_stderr = sys.stderr
        self._log = None
        self._saved_fd: int | None = None
        self._rerouted: list[tuple[logging.StreamHandler, object]] = []
        self._warnings_handler: logging.Handler | None = None

    def start(self) -> None:
        self._log = open(self.log_path, "a", encoding="utf-8", buffering=1)
        sys.stderr.flush()
        self._saved_fd = os.dup(2)
        os.dup2(self._log.fileno(), 2)
        self.terminal_stderr = open(self._saved_fd, "w", buffering=1, closefd=False,
                                    encoding="utf-8", errors="backslashreplace")
        logging.captureWarnings(True)
        self._warnings_handler = logging.StreamHandler(self._log)
        logging.getLogger("py.warnings").addHandler(self._warnings_handler)
        self.route_ray_loggers()

    def route_ray_loggers(self) -> None:
        """Points every console handler of the `ray` logger tree at the log file. Ray and
        Ray Train add handlers as they start, so the driver calls this again after each
        stage; handlers already rerouted are left alone."""
        if self._log is None:
            return
        names = ["ray", *(n for n in logging.root.manager.loggerDict if n.startswith("ray."))]
        seen = {id(h) for h, _ in self._rerouted}
        for name in names:
            for handler in logging.getLogger(name).handlers:
                if (isinstance(handler, logging.StreamHandler)
                        and not isinstance(handler, logging.FileHandler) and id(handler) not in seen):
                    self._rerouted.append((handler, _set_stream(handler, self._log)))
                    seen.add(id(handler))

    def stop(self) -> None:
        if self._log is None:
            return
        for handler, stream in self._rerouted:
            # A handler made while sys.stderr was another program's stream (pytest's
            # capture, a notebook's) may hold it closed by now: then the terminal.
            _set_stream(handler, sys.stderr if getattr(stream, "closed", False) else stream)
        self._rerouted.clear()
        logging.getLogger("py.warnings").removeHandler(self._warnings_handler)
        logging.captureWarnings(False)
        sys.stderr.flush()
        self.terminal_stderr.flush()
        os.dup2(self._saved_fd, 2)
        os.close(self._saved_fd)
        self._saved_fd = None
        self.terminal_stderr = sys.stderr
        self._log.close()
        self._log = None

    def error_summary(self, max_chars: int = 240) -> str | None:
        """One line: how many error lines Ray logged and the first of them, or None."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as handle:
                errors = [line.strip() for line in handle if _ERROR_LINE.search(line)]
        except OSError:
            return None
        if not errors:
            return None
        return (f"Ray logged {len(errors)} error line{'s' * (len(errors) > 1)} "
                f"(all in {self.log_path}); first: {errors[0][:max_chars]}")

"""Ray's output kept off the progress display: descriptor 2, the `ray` logger tree and
Python warnings go to the job's ray.log while foldmoe's own messages reach the terminal."""
from __future__ import annotations

import logging
import os
import sys
import warnings

from orchestrator.ray_output import RayOutputCapture


def test_fd2_ray_loggers_and_warnings_go_to_the_log_and_are_restored(tmp_path, capfd):
    ray_logger = logging.getLogger("ray.test_capture")
    handler = logging.StreamHandler(sys.stderr)
    ray_logger.addHandler(handler)
    ray_logger.propagate = False
    capture = RayOutputCapture(str(tmp_path / "ray.log"))
    try:
        capture.start()
        os.write(2, b"[2026-12-01 10:00:00,000 E 123 456] core_worker.cc:99: lost a lease\n")
        ray_logger.warning("Token authentication is enabled")
        warnings.warn("a Ray deprecation")
        print("foldmoe: place workers ...", file=capture.terminal_stderr, flush=True)
    finally:
        capture.stop()
        ray_logger.removeHandler(handler)
    os.write(2, b"after the job\n")
    log = (tmp_path / "ray.log").read_text()
    assert "core_worker.cc:99: lost a lease" in log and "Token authentication" in log
    assert "a Ray deprecation" in log
    terminal = capfd.readouterr().err
    assert "foldmoe: place workers ..." in terminal and "after the job" in terminal
    assert "lost a lease" not in terminal and "Token authentication" not in terminal
    assert handler.stream is sys.stderr                      # the handler is given back its stream
    assert capture.error_summary() == (
        f"Ray logged 1 error line (all in {tmp_path / 'ray.log'}); first: [2026-12-01 10:00:00,000 "
        "E 123 456] core_worker.cc:99: lost a lease")


def test_no_errors_no_summary(tmp_path):
    (tmp_path / "ray.log").write_text("2026-12-01 10:00:00,000\tINFO worker.py:1 -- Started\n")
    assert RayOutputCapture(str(tmp_path / "ray.log")).error_summary() is None


def test_a_ray_handler_holding_a_closed_stream_is_rerouted_and_given_the_terminal_back(tmp_path):
    """A handler made while sys.stderr was a stream that is closed by now (pytest's capture
    of an earlier test, a notebook's): rerouting must not flush it (ValueError)."""
    import io
    gone = io.StringIO()
    handler = logging.StreamHandler(gone)
    ray_logger = logging.getLogger("ray.test_closed_stream")
    ray_logger.addHandler(handler)
    gone.close()
    capture = RayOutputCapture(str(tmp_path / "ray.log"))
    try:
        capture.start()
        assert handler.stream is not gone
        ray_logger.warning("to the log")
    finally:
        capture.stop()
        ray_logger.removeHandler(handler)
    assert handler.stream is sys.stderr
    assert "to the log" in (tmp_path / "ray.log").read_text()

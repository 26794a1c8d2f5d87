"""The session's multi-node Ray cluster for the elastic tests: `tests/orchestrator/ray_nodes.py`
in a process of its own (a 0-CPU head plus worker nodes, token auth on), separate from the
single-node `ray_cluster` fixture of tests/conftest.py. Torn down at the end of the session
by its own `quit`, else by killing its process group."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from .jobs import ROOT, cli_env

NODES, CPUS_PER_NODE = 2, 2


class RayNodes:
    """Talks to the cluster process: remove() and add() a worker node."""

    def __init__(self, proc: subprocess.Popen, auth: dict[str, str], log_path: str):
        self.proc, self.auth, self.log_path = proc, auth, log_path
        self._lock = threading.Lock()
        self.info = self._answer(timeout_s=180)

    def _answer(self, timeout_s: float) -> dict:
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        # Ray's own processes inherit the pipe, so EOF does not come when ours exits: poll it.
        deadline = time.monotonic() + timeout_s
        while reader.is_alive() and time.monotonic() < deadline and self.proc.poll() is None:
            reader.join(0.5)
        reader.join(2.0)
        if not line or not line[0]:
            state = "running" if self.proc.poll() is None else f"exited {self.proc.returncode}"
            raise RuntimeError(f"the Ray cluster process gave no answer ({state}, {timeout_s:.0f} s allowed); "
                               f"the end of its stderr: {self._log_tail()}")
        return json.loads(line[0])

    def _log_tail(self, chars: int = 3000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-chars:].decode(errors="replace") or "(empty)"
        except OSError as err:
            return f"(unreadable: {err})"

    def _command(self, command: str) -> dict:
        with self._lock:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
            return self._answer(timeout_s=120)

    @property
    def address(self) -> str:
        return self.info["address"]

    def remove(self) -> dict:
        """Kills the newest worker node's raylet and workers (SIGKILL: a node lost for good)."""
        return self._command("remove")

    def add(self) -> dict:
        return self._command("add")

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a driver that joins this cluster."""
        return cli_env(RAY_ADDRESS=self.address, **self.auth, **extra)


@pytest.fixture(scope="session")
def ray_nodes():
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    temp_dir = tempfile.mkdtemp(prefix="rayn", dir="/tmp")   # short: unix socket path limit
    log_path = os.path.join(temp_dir, "cluster.log")
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "orchestrator" / "ray_nodes.py"), temp_dir,
         str(NODES), str(CPUS_PER_NODE)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, env=cli_env(**auth),
        start_new_session=True)
    try:
        yield RayNodes(proc, auth, log_path)
    finally:
        try:
            proc.stdin.write("quit\n")
            proc.stdin.close()
            proc.wait(60)
        except (OSError, subprocess.TimeoutExpired):
            pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(15)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)

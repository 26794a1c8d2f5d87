"""A stop (the driver's SIGTERM) while the torchrun supervisor spawns a restarted group tears
that new group down: before, stop() read the old, already reaped group without the lock and
the new workers, in their own sessions, outlived the driver."""
import os
import subprocess
import time

import orchestrator.torchrun_launcher as launcher_module
from orchestrator.config import build_run_config


def test_a_stop_during_a_restart_tears_the_new_group_down(tmp_path, monkeypatch):
    run = build_run_config({"cluster": {"num_workers": 2, "max_failures": 3}, "tracking": {"enabled": False}})
    monkeypatch.setattr(launcher_module, "worker_command", lambda spec: ["sleep", "30"])
    real_popen, calls = subprocess.Popen, []

    def popen(*args, **kwargs):
        calls.append(1)
        if len(calls) <= 2:                       # the first group fails at once
            return real_popen(["sh", "-c", "exit 1"], **{k: v for k, v in kwargs.items() if k != "env"})
        time.sleep(0.3)                           # the restart's spawn is slow (a loaded host)
        return real_popen(*args, **kwargs)

    monkeypatch.setattr(launcher_module.subprocess, "Popen", popen)
    supervisor = launcher_module.TorchrunLauncher(run, str(tmp_path / "spec.json"), str(tmp_path / "w.log"),
                                                  str(tmp_path / "controller.jsonl"))
    supervisor.start()
    deadline = time.monotonic() + 30
    while len(calls) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    supervisor.stop(timeout_s=2)
    procs = supervisor._group.procs
    try:
        assert all(p.poll() is not None for p in procs), [(p.pid, p.poll()) for p in procs]
        assert not supervisor._thread.is_alive()
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)

"""A hung rank on another Ray node than the driver (another host, another KubeRay pod) is
SIGKILLed by the watchdog through a 0-CPU task pinned to its node: on the session's
multi-node Ray (multinode.py), the rank is an actor on a worker node, the driver is on the
head (0 CPUs), and its heartbeat carries the node id that kill_rank needs."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .jobs import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_a_stopped_rank_on_another_node_is_killed_through_ray(ray_nodes, tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "tests/orchestrator/remote_kill_case.py"),
                          str(tmp_path)], env=ray_nodes.env(), cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    print(f"\nremote kill: {result['message']} in {result['kill_s']:.2f} s")
    assert result["beat_node"] and result["beat_node"] != result["driver_node"], result
    assert result["message"] == f"killed pid {result['pid']} on Ray node {result['beat_node'][:12]}"
    assert not result["alive"], result

"""`foldmoe validate` / `train` with the memory model: the per-role table and JSON, and the
refusal of a config that cannot fit (exit 2, one line, before anything starts)."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny-moe.yaml")
MIXTRAL = str(ROOT / "configs" / "mixtral-8x7b-16gpu.yaml")
H100_BYTES = 80 * 10**9

# Times main() inside a fresh interpreter (imports excluded) and lists the heavy modules loaded.
_PROBE = ("import sys, time\nfrom orchestrator.cli import main\nstart = time.perf_counter()\n"
          "rc = main(sys.argv[1:])\nelapsed = time.perf_counter() - start\n"
          "print('PROBE', elapsed, sorted({m.split('.')[0] for m in sys.modules} & "
          "{'ray', 'mlflow', 'torch'}))\nsys.exit(rc)")


def _cli(args, cwd, probe=False):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-c", _PROBE, *args] if probe else [sys.executable, "-m", "orchestrator.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_validate_json_reports_every_mixtral_rank_under_80_gb(tmp_path):
    out = _cli(["validate", MIXTRAL, "--json"], tmp_path)
    assert out.returncode == 0, out.stderr
    memory = json.loads(out.stdout)["memory"]
    assert memory["device_bytes"] == H100_BYTES
    assert [r["role"] for r in memory["ranks"]] == ["stage 0 (first)", "stage 1 (last)"]
    for rank in memory["ranks"]:
        assert rank["total"] == rank["params"] + rank["grads"] + rank["optimizer"] + rank["activations"]
        assert 0 < rank["total"] < H100_BYTES, rank


def test_a_layout_that_cannot_fit_is_refused_in_under_a_second(tmp_path):
    for command in ("validate", "train"):
        out = _cli([command, MIXTRAL, "--set", "parallel.ep=1"], tmp_path, probe=True)
        assert out.returncode == 2, out.stderr
        (line,) = out.stderr.strip().splitlines()
        assert line.startswith("config error: memory: stage "), line
        assert "largest term: grads" in line and "raise parallel.ep (now 1)" in line, line
        probe = [l for l in out.stdout.splitlines() if l.startswith("PROBE")][0].split(None, 2)
        assert float(probe[1]) < 1.0, probe          # the model is arithmetic: milliseconds
        assert probe[2] == "[]", probe                # no torch, ray or mlflow
    assert list(tmp_path.iterdir()) == []             # train wrote nothing


def test_validate_prints_layout_then_memory_then_resolved_config(tmp_path):
    out = _cli(["validate", TINY], tmp_path)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    layout, memory, config = (text.index("folded layout, world size 4"),
                              text.index("memory per worker, predicted"), text.index("resolved config:"))
    assert layout < memory < config
    assert "CPU workers: not checked" in text and "stage 0 (first+last)" in text


def test_cpu_workers_are_checked_against_device_memory_gb(tmp_path):
    out = _cli(["validate", TINY, "--set", "cluster.device_memory_gb=0.001"], tmp_path)
    assert out.returncode == 2
    assert out.stderr.startswith("config error: memory: stage 0 (first+last) needs "), out.stderr
    assert "cluster.device_memory_gb=0.001" in out.stderr
    assert "memory per worker" in out.stdout          # the table is printed before the refusal


def test_optimizer_term_suggests_zero1(tmp_path):
    out = _cli(["validate", MIXTRAL, "--set", "train.zero1=false", "--set", "cluster.gpu=a100",
                "--set", "cluster.device_memory_gb=40"], tmp_path)
    assert out.returncode == 2
    assert "largest term: optimizer" in out.stderr and "set train.zero1=true" in out.stderr

"""`foldmoe plan` output, filters and errors, and `parallel.auto` in `validate` (subprocesses)."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny-moe.yaml")
KEYS = {"tp", "cp", "pp", "vpp", "ep", "etp", "dp", "edp", "cp_mode", "micro_batch_size", "recompute",
        "step_time_s", "mfu", "memory_bytes", "breakdown"}


def _cli(args, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_plan_json_lists_sorted_feasible_layouts(tmp_path):
    out = _cli(["plan", TINY, "--gpus", "8", "--gpu", "h100", "--json", "--top", "0"], tmp_path)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert {"searched", "seconds", "layouts"} <= set(doc)
    rows = doc["layouts"]
    assert len(rows) > 10 and KEYS <= set(rows[0])
    assert [r["step_time_s"] for r in rows] == sorted(r["step_time_s"] for r in rows)
    assert all(r["tp"] * r["cp"] * r["pp"] * r["dp"] == 8 == r["etp"] * r["ep"] * r["pp"] * r["edp"]
               for r in rows)
    assert set(rows[0]["breakdown"]) == {"compute", "tp", "cp", "ep", "pp", "bubble", "dp", "optimizer"}
    top2 = json.loads(_cli(["plan", TINY, "--gpus", "8", "--gpu", "h100", "--json", "--top", "2"],
                           tmp_path).stdout)["layouts"]
    assert top2 == rows[:2]


def test_plan_only_and_text_table(tmp_path):
    out = _cli(["plan", TINY, "--gpus", "8", "--gpu", "h100", "--only", "tp=2,ep=4", "--top", "0",
                "--json"], tmp_path)
    rows = json.loads(out.stdout)["layouts"]
    assert rows and all(r["tp"] == 2 and r["ep"] == 4 for r in rows)
    text = _cli(["plan", TINY, "--gpus", "8", "--gpu", "h100", "--top", "3"], tmp_path).stdout
    assert "TP CP PP VPP EP ETP   DP EDP  mbs recompute" in text
    assert text.count("breakdown #") == 3


def test_plan_costs_the_configured_cp_flavour(tmp_path):
    args = ["plan", TINY, "--gpus", "8", "--gpu", "h100", "--only", "cp=2,pp=1,ep=1", "--top", "0"]
    ring = json.loads(_cli([*args, "--json"], tmp_path).stdout)["layouts"]
    a2a = json.loads(_cli([*args, "--json", "--set", "parallel.cp_mode=a2a"], tmp_path).stdout)["layouts"]
    assert {r["cp_mode"] for r in ring} == {"ring"} and {r["cp_mode"] for r in a2a} == {"a2a"}
    key = lambda r: (r["tp"], r["micro_batch_size"], r["recompute"])   # noqa: E731
    ring_by_layout = {key(r): r for r in ring}
    # a2a needs the heads of a TP rank divisible by cp: a subset of the ring's layouts
    assert a2a and {key(r) for r in a2a} < set(ring_by_layout)
    assert all(r["breakdown"]["cp"] != ring_by_layout[key(r)]["breakdown"]["cp"] for r in a2a)
    assert "CP rows run parallel.cp_mode=a2a" in _cli([*args, "--set", "parallel.cp_mode=a2a"], tmp_path).stdout
    assert "cp_mode" not in _cli(args, tmp_path).stdout


def test_plan_errors_exit_2_with_one_line(tmp_path):
    for args, expected in ((["--only", "tq=2"], "--only tq=2: expected key=value"),
                           (["--set", "cluster.device_memory_gb=0.0001"],
                            "plan: no folded layout of 8 GPUs fits in memory"),
                           (["--only", "tp=3"], "plan: no valid layout of 8 ranks has tp=3"),
                           (["--gpus", "7"], "plan: no folded layout of 7 ranks is valid"),
                           (["--calibrate", "--gpu", "h100"], "--calibrate --gpu h100:")):
        out = _cli(["plan", TINY, "--gpus", "8", *args], tmp_path)
        assert out.returncode == 2, (args, out.stderr)
        assert out.stderr.strip().splitlines()[-1].startswith(f"config error: {expected}"), out.stderr
        assert "TP CP PP" not in out.stdout, out.stdout        # no empty table before the error


def test_validate_with_auto_shows_the_plans_first_row(tmp_path):
    out = _cli(["validate", TINY, "--set", "parallel.auto=true", "--json"], tmp_path)
    assert out.returncode == 0, out.stderr
    groups = json.loads(out.stdout)["groups"]
    first = json.loads(_cli(["plan", TINY, "--gpus", "4", "--set", "parallel.auto=true", "--json"],
                            tmp_path).stdout)["layouts"][0]
    assert len(groups["tp"][0]) == first["tp"] and len(groups["ep"][0]) == first["ep"]
    assert len(groups["pp"][0]) == first["pp"] and len(groups["etp"][0]) == first["etp"]
    text = _cli(["validate", TINY, "--set", "parallel.auto=true"], tmp_path).stdout
    assert text.startswith("parallel.auto: the planner's first row for 4 workers")
    seven = _cli(["validate", TINY, "--set", "parallel.auto=true", "--set", "cluster.num_workers=7"], tmp_path)
    assert seven.returncode == 2 and seven.stderr.strip().splitlines()[-1].startswith(
        "config error: parallel.auto=true: no folded layout of 7 ranks is valid"), seven.stderr

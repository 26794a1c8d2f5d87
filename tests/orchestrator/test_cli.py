"""`foldmoe validate` output and `foldmoe train` refusing bad configs (subprocesses)."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny-moe.yaml")


def _cli(args: list[str], cwd, code: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "orchestrator.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_validate_json_has_config_and_every_axis_group(tmp_path):
    out = _cli(["validate", TINY, "--json", "--set", "parallel.ep=2"], tmp_path)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert {"config", "groups"} <= set(doc)
    assert doc["config"]["parallel"]["ep"] == 2
    assert set(doc["groups"]) == {"tp", "cp", "dp", "pp", "dp_cp", "tp_cp", "etp", "ep", "edp", "etp_ep"}
    # World 4, tp2 ep2: ep groups pair ranks at stride 1, edp at stride ep = 2 (hand-derived).
    assert doc["groups"]["ep"] == [[0, 1], [2, 3]]
    assert doc["groups"]["edp"] == [[0, 2], [1, 3]]
    assert doc["groups"]["etp_ep"] == [[0, 1], [2, 3]]


def test_validate_text_prints_config_and_layout_table(tmp_path):
    out = _cli(["validate", TINY], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "preset: tiny-moe" in out.stdout
    assert "world size 4: attention tp=2 cp=1 dp=2 pp=1; MoE etp=1 ep=4 edp=1 pp=1" in out.stdout
    lines = {line.split()[0]: line for line in out.stdout.splitlines() if line.startswith("  ")
             and line.split()[0] in ("tp", "dp", "ep")}
    assert lines["tp"].split(None, 1)[1] == "[0, 1] [2, 3]"
    assert lines["dp"].split(None, 1)[1] == "[0, 2] [1, 3]"
    assert lines["ep"].split(None, 1)[1] == "[0, 1, 2, 3]"


def test_validate_says_the_layout_of_every_elastic_world_size(tmp_path):
    args = ["validate", TINY, "--set", "cluster.num_workers=[2, 4]",
            "--set", "train.global_batch_size=12"]
    out = _cli(args, tmp_path)
    assert out.returncode == 0, out.stderr
    assert "     2 workers: tp2 cp1 pp1 (vpp1) ep2 etp1 -> dp1 edp1" in out.stdout
    assert "     3 workers: tp1 cp1 pp1 (vpp1) ep1 etp1 -> dp3 edp3" in out.stdout
    assert "     4 workers: tp2 cp1 pp1 (vpp1) ep4 etp1 -> dp2 edp1" in out.stdout
    doc = json.loads(_cli(args + ["--json"], tmp_path).stdout)
    assert doc["elastic_layouts"]["3"] == "tp1 cp1 pp1 (vpp1) ep1 etp1 -> dp3 edp3"
    # A size in [min, max] without a layout is refused at config time, naming it.
    bad = _cli(["validate", TINY, "--set", "cluster.num_workers=[2, 4]"], tmp_path)
    assert bad.returncode == 2 and "world size 3 admits no layout" in bad.stderr


# Runs the CLI in-process in a fresh interpreter, then reports which heavy modules it loaded.
_PROBE = ("import sys\nfrom orchestrator.cli import main\nrc = main(sys.argv[1:])\n"
          "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'mlflow', 'torch'}))\n"
          "sys.exit(rc)")


def test_train_with_bad_layout_exits_2_fast_without_ray_or_files(tmp_path):
    start = time.monotonic()
    out = _cli(["train", TINY, "--set", "parallel.tp=3"], tmp_path, code=_PROBE)
    elapsed = time.monotonic() - start
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "config error: parallel.tp=3: tp*cp*pp = 3*1*1 = 3 does not divide the world size 4 "
        "(cluster.num_workers=4)"]
    assert out.stdout.strip() == "[]"          # neither ray, mlflow nor torch was imported
    assert list(tmp_path.iterdir()) == []      # nothing written (no mlflow.db, runs/, checkpoints/)
    assert elapsed < 15, elapsed               # "in seconds" even on a loaded 2-core machine


def test_train_with_unknown_key_and_missing_file_exit_2(tmp_path):
    out = _cli(["train", TINY, "--set", "train.stpes=3"], tmp_path)
    assert out.returncode == 2 and out.stderr.strip() == "config error: train.stpes=3: unknown key"
    out = _cli(["validate", str(tmp_path / "nope.yaml")], tmp_path)
    assert out.returncode == 2 and "cannot read" in out.stderr

"""`foldmoe eval --launcher ray` on the session's local Ray: the checkpoint of a 2-step Ray
job (2 workers, DP2 x EP2) evaluated by 2 Ray workers in another layout (TP2, EP2) gives the
loss of `--launcher inline` at world 1 (fp32, relative 1e-5: the layouts change only the
order of fp32 sums in the forward, ~1e-7; docs in engine/testing/parity.py).

The driver runs in-process (the test is the driver), as in test_ray_jobs.py."""
from __future__ import annotations

import json
import time

import pytest

from orchestrator.cli import main
from orchestrator.config import load_config
from orchestrator.driver import run_training

from .jobs import TINY, job_overrides, set_args

pytestmark = [pytest.mark.slow, pytest.mark.ray]

TRAIN_LAYOUT = ["cluster.num_workers=2", "parallel.tp=1", "parallel.ep=2"]
EVAL_LAYOUTS = {"ray": ["cluster.num_workers=2", "parallel.tp=2", "parallel.ep=2"],
                "inline": ["cluster.num_workers=1", "parallel.tp=1", "parallel.ep=1"]}


def eval_json(overrides: list[str], launcher: str, capsys) -> dict:
    capsys.readouterr()
    assert main(["eval", TINY, *set_args(overrides), "--launcher", launcher, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_ray_eval_of_a_ray_checkpoint_equals_inline(ray_cluster, tmp_path, data_cache, capsys):
    common = job_overrides(tmp_path, data_cache, steps=2, every=2, extra=["tracking.enabled=false"])
    result = run_training(load_config(TINY, common + TRAIN_LAYOUT), launcher="ray", live_progress=False)
    assert result.rc == 0, result.error
    assert (tmp_path / "ckpt").is_dir()
    losses, seconds = {}, {}
    for launcher, layout in EVAL_LAYOUTS.items():
        started = time.monotonic()
        losses[launcher] = eval_json(common + layout, launcher, capsys)
        seconds[launcher] = time.monotonic() - started
    with capsys.disabled():
        print(f"\n[figures] eval of a 2-step Ray checkpoint: {losses}, seconds {seconds}")
    ray_eval, inline = losses["ray"], losses["inline"]
    assert ray_eval["tokens"] == inline["tokens"] > 0
    assert abs(ray_eval["loss"] - inline["loss"]) <= 1e-5 * abs(inline["loss"]), losses

"""Every mesh axis through `foldmoe train`, on both launchers: the same job under different
folded layouts gives the same per-step losses (the engine is layout-invariant; fp32 sums in
another order only, so 1e-5 relative is ample and a real layout bug is far larger).

All layouts keep dp x micro_batch_size = 4 sequences per global micro-batch, so the MoE
statistics (per global micro-batch) are the same too.
"""
from __future__ import annotations

import pytest

from orchestrator.config import load_config
from orchestrator.driver import run_training

from .jobs import TINY, job_overrides, read_jsonl, run_cli, set_args

pytestmark = pytest.mark.slow

STEPS = 3
LAYOUTS = {  # name: (parallel.* settings, micro_batch_size); 4 workers, global batch 8
    "TP2xDP2/EP4": ("tp=2 ep=4", 2),
    "DP4/ETP2xEP2": ("tp=1 ep=2 etp=2", 1),
    "CP2xDP2/EP4": ("tp=1 cp=2 ep=4", 2),
    "CP2xPP2xVPP2/ETP2": ("tp=1 cp=2 pp=2 vpp=2 ep=1 etp=2", 4),
    "TP2xPP2/EP2": ("tp=2 pp=2 ep=2", 4),
}


def _overrides(tmp, data_cache, layout: str, mbs: int) -> list[str]:
    extra = [f"parallel.{kv}" for kv in layout.split()]
    extra += ["train.global_batch_size=8", f"train.micro_batch_size={mbs}", "tracking.enabled=false"]
    return job_overrides(tmp, data_cache, steps=STEPS, extra=extra)


def _losses(records: list[dict]) -> list[float]:
    assert [r["step"] for r in records] == list(range(STEPS))
    return [r["loss"] for r in records]


def _assert_same_losses(got: list[float], want: list[float], label: str) -> None:
    for a, b in zip(got, want, strict=True):
        assert abs(a - b) <= 1e-5 * abs(b), (label, got, want)


def test_every_axis_through_foldmoe_train_under_torchrun(tmp_path, data_cache):
    losses = {}
    for name, (layout, mbs) in LAYOUTS.items():
        tmp = tmp_path / name.replace("/", "_")
        tmp.mkdir()
        out = run_cli(["train", TINY, "--launcher", "torchrun", "--metrics-jsonl", "m.jsonl",
                       *set_args(_overrides(tmp, data_cache, layout, mbs))], cwd=tmp)
        assert out.returncode == 0, (name, out.stdout[-2000:] + out.stderr[-3000:])
        losses[name] = _losses(read_jsonl(tmp / "m.jsonl"))
    reference = losses.pop("TP2xDP2/EP4")
    for name, got in losses.items():
        _assert_same_losses(got, reference, name)
    print("\n[figures] per-layout losses equal under torchrun:", reference)


@pytest.mark.ray
def test_cp_pp_vpp_etp_layout_on_ray_train(ray_cluster, tmp_path, data_cache):
    results = {}
    for name in ("TP2xDP2/EP4", "CP2xPP2xVPP2/ETP2"):
        tmp = tmp_path / name.replace("/", "_")
        tmp.mkdir()
        layout, mbs = LAYOUTS[name]
        run = load_config(TINY, _overrides(tmp, data_cache, layout, mbs))
        result = run_training(run, launcher="ray", metrics_jsonl=str(tmp / "m.jsonl"),
                              live_progress=False)
        assert result.rc == 0, (name, result.error)
        results[name] = _losses(read_jsonl(tmp / "m.jsonl"))
    _assert_same_losses(results["CP2xPP2xVPP2/ETP2"], results["TP2xDP2/EP4"], "ray")

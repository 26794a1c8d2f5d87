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
REFERENCE = "TP2xDP2/EP4"


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


@pytest.fixture(scope="module")
def torchrun_losses(tmp_path_factory, data_cache) -> dict[str, list[float]]:
    """Every layout's per-step losses under `--launcher torchrun`."""
    losses = {}
    for name, (layout, mbs) in LAYOUTS.items():
        tmp = tmp_path_factory.mktemp(name.replace("/", "_"))
        out = run_cli(["train", TINY, "--launcher", "torchrun", "--metrics-jsonl", "m.jsonl",
                       *set_args(_overrides(tmp, data_cache, layout, mbs))], cwd=tmp)
        assert out.returncode == 0, (name, out.stdout[-2000:] + out.stderr[-3000:])
        losses[name] = _losses(read_jsonl(tmp / "m.jsonl"))
    return losses


def test_every_axis_through_foldmoe_train_under_torchrun(torchrun_losses):
    reference = torchrun_losses[REFERENCE]
    for name, got in torchrun_losses.items():
        _assert_same_losses(got, reference, name)
    print("\n[figures] per-layout losses equal under torchrun:", reference)


@pytest.mark.ray
def test_cp_pp_vpp_etp_layout_on_ray_train(ray_cluster, torchrun_losses, tmp_path, data_cache):
    """The most folded layout on Ray Train V2 gives torchrun's losses: the launcher changes
    neither the data each rank reads nor the model it builds."""
    name = "CP2xPP2xVPP2/ETP2"
    layout, mbs = LAYOUTS[name]
    run = load_config(TINY, _overrides(tmp_path, data_cache, layout, mbs))
    result = run_training(run, launcher="ray", metrics_jsonl=str(tmp_path / "m.jsonl"),
                          live_progress=False)
    assert result.rc == 0, (name, result.error)
    on_ray = _losses(read_jsonl(tmp_path / "m.jsonl"))
    _assert_same_losses(on_ray, torchrun_losses[name], "ray vs torchrun")
    _assert_same_losses(on_ray, torchrun_losses[REFERENCE], "ray vs torchrun's TP2xDP2/EP4")

"""Peak lookup by device name (with sources), the cached CPU calibration, MFU arithmetic."""
import json
import time

import pytest
import torch

from engine.metrics.peak import mfu, peak_flops_for_name, peak_flops_per_device, tflops_per_device
from engine.metrics.calibration import CACHE_FILE, cache_dir, calibration_key
from engine.metrics.peak import PEAK_FLOPS, PEAK_SOURCES


@pytest.mark.parametrize("name, dtype, expected", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989e12),
    ("NVIDIA H200", "bf16", 989e12),
    ("NVIDIA H100 PCIe", torch.bfloat16, 756e12),
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312e12),
    ("NVIDIA A100 80GB PCIe", torch.float32, 19.5e12),
    ("NVIDIA L40S", torch.bfloat16, 362e12),
    ("NVIDIA L4", torch.bfloat16, 121e12),
])
def test_datasheet_lookup(name, dtype, expected):
    value, source = peak_flops_for_name(name, dtype)
    assert value == expected
    assert "datasheet" in source and name in source


def test_unknown_or_unsupported_is_none():
    assert peak_flops_for_name("Some Future Accelerator", torch.bfloat16) is None
    assert peak_flops_for_name("Tesla V100-SXM2-16GB", torch.bfloat16) is None  # no bf16 units


def test_cpu_peak_is_calibrated_once_per_machine_and_cached(tmp_path):
    value, source = peak_flops_per_device("cpu", torch.float32, cache_dir=str(tmp_path))
    assert value > 1e8 and source.startswith("calibrated peak") and str(tmp_path) in source
    (entry,) = json.loads((tmp_path / CACHE_FILE).read_text()).values()
    assert entry["flops"] == value
    # A later run (any process: the cache is a file) reads it back without measuring.
    start = time.perf_counter()
    again, again_source = peak_flops_per_device(torch.device("cpu"), "fp32", cache_dir=str(tmp_path))
    assert (again, again_source) == (value, source) and time.perf_counter() - start < 0.2
    # Another dtype is another calibration; both are kept.
    peak_flops_per_device("cpu", "bf16", cache_dir=str(tmp_path))
    assert len(json.loads((tmp_path / CACHE_FILE).read_text())) == 2


def test_a_damaged_cache_is_measured_again(tmp_path):
    (tmp_path / CACHE_FILE).write_text("{not json")
    value, _ = peak_flops_per_device("cpu", "fp32", cache_dir=str(tmp_path))
    assert json.loads((tmp_path / CACHE_FILE).read_text())[calibration_key(
        torch.device("cpu"), "fp32")]["flops"] == value


def test_cache_dir_follows_the_user_cache_conventions(monkeypatch, tmp_path):
    monkeypatch.delenv("FOLDMOE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == str(tmp_path / "foldmoe")
    monkeypatch.setenv("FOLDMOE_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir() == str(tmp_path / "mine")


def test_every_datasheet_row_names_its_source():
    assert set(PEAK_SOURCES) == set(PEAK_FLOPS)
    _, source = peak_flops_for_name("NVIDIA H100 80GB HBM3", "bf16")
    assert PEAK_SOURCES["H100 SXM"] in source


def test_mfu_and_tflops_arithmetic():
    # 1e15 FLOPs in 2 s on 4 devices of 250 TFLOP/s: 1e15 / (2·4·250e12) = 0.5
    assert mfu(1e15, 2.0, 4, 250e12) == pytest.approx(0.5, rel=1e-12)
    # 8e15 FLOPs in 2 s on 4 devices: 8e15 / (2·1e12·4) = 1000 TFLOP/s per device
    assert tflops_per_device(8e15, 2.0, 4) == pytest.approx(1000.0, rel=1e-12)
    with pytest.raises(ValueError, match="iter_time_s"):
        mfu(1e15, 0.0, 4, 250e12)
    with pytest.raises(ValueError, match="peak"):
        mfu(1e15, 1.0, 4, 0.0)

"""Peak lookup by device name, CPU measurement, MFU arithmetic."""
import time

import pytest
import torch

from engine.metrics import mfu, peak_flops_for_name, peak_flops_per_device, tflops_per_device


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


def test_cpu_peak_is_measured_once_and_says_so():
    start = time.perf_counter()
    value, source = peak_flops_per_device("cpu", torch.float32)
    first = time.perf_counter() - start
    assert value > 1e8 and "measured on CPU" in source
    start = time.perf_counter()
    again, _ = peak_flops_per_device(torch.device("cpu"), "fp32")
    assert again == value and time.perf_counter() - start < 0.01  # cached
    assert first < 1.0


def test_mfu_and_tflops_arithmetic():
    # 1e15 FLOPs in 2 s on 4 devices of 250 TFLOP/s: 1e15 / (2·4·250e12) = 0.5
    assert mfu(1e15, 2.0, 4, 250e12) == pytest.approx(0.5, rel=1e-12)
    # 8e15 FLOPs in 2 s on 4 devices: 8e15 / (2·1e12·4) = 1000 TFLOP/s per device
    assert tflops_per_device(8e15, 2.0, 4) == pytest.approx(1000.0, rel=1e-12)
    with pytest.raises(ValueError, match="iter_time_s"):
        mfu(1e15, 0.0, 4, 250e12)
    with pytest.raises(ValueError, match="peak"):
        mfu(1e15, 1.0, 4, 0.0)

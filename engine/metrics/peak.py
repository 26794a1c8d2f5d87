"""Peak FLOP/s per device and MFU.

GPU peaks are datasheet dense tensor-core figures (no 2:4 sparsity), looked up by the CUDA
device name. On CPU there is no honest datasheet number, so a short matmul benchmark is
measured once per (dtype, thread count) and the source string says it was measured.
"""
from __future__ import annotations

import time

import torch

# Dense (non-sparse) peak FLOP/s from vendor datasheets. fp32 = non-tensor-core FP32.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "B200": {"bf16": 2250e12, "fp16": 2250e12, "tf32": 1100e12, "fp32": 75e12},
    "H200 SXM": {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 66.9e12},
    "H100 SXM": {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 66.9e12},
    "H100 NVL": {"bf16": 835e12, "fp16": 835e12, "tf32": 417.5e12, "fp32": 60e12},
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51.2e12},
    "H20": {"bf16": 148e12, "fp16": 148e12, "tf32": 74e12, "fp32": 44e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "tf32": 183e12, "fp32": 91.6e12},
    "L40": {"bf16": 181e12, "fp16": 181e12, "tf32": 90.5e12, "fp32": 90.5e12},
    "L4": {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12},
    "RTX 4090": {"bf16": 165.2e12, "fp16": 165.2e12, "tf32": 82.6e12, "fp32": 82.6e12},
    "V100": {"fp16": 125e12, "fp32": 15.7e12},
    "MI300X": {"bf16": 1307.4e12, "fp16": 1307.4e12, "tf32": 653.7e12, "fp32": 163.4e12},
}

# (substrings that must all appear in the upper-cased device name, table key); first match wins,
# so the more specific names come first ("H100 PCIe" before "H100", "A100" before "A10").
_NAME_RULES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("B200",), "B200"),
    (("GH200",), "H100 SXM"),
    (("H200",), "H200 SXM"),
    (("H100", "PCIE"), "H100 PCIe"),
    (("H100", "NVL"), "H100 NVL"),
    (("H100",), "H100 SXM"),
    (("H800",), "H100 SXM"),
    (("H20",), "H20"),
    (("A100",), "A100"),
    (("A800",), "A100"),
    (("L40S",), "L40S"),
    (("L40",), "L40"),
    (("L4",), "L4"),
    (("4090",), "RTX 4090"),
    (("V100",), "V100"),
    (("MI300X",), "MI300X"),
)

_DTYPE_KEYS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_BENCH_N = {"cpu": 512, "cuda": 4096}  # large enough to reach the GEMM plateau on each
_BENCH_SECONDS = 0.25
_measured_peaks: dict[tuple[str, int], float] = {}


def dtype_key(dtype: torch.dtype | str) -> str:
    if isinstance(dtype, str):
        key = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(dtype, dtype)
    else:
        key = _DTYPE_KEYS.get(dtype, "")
    if key not in ("bf16", "fp16", "tf32", "fp32"):
        raise ValueError(f"dtype {dtype!r}: expected bf16, fp16, tf32 or fp32")
    return key


def table_entry_for_name(device_name: str) -> str | None:
    """The PEAK_FLOPS key for a CUDA/ROCm device name, or None when unknown."""
    upper = device_name.upper()
    for needles, key in _NAME_RULES:
        if all(needle in upper for needle in needles):
            return key
    return None


def peak_flops_for_name(device_name: str, dtype: torch.dtype | str) -> tuple[float, str] | None:
    key, precision = table_entry_for_name(device_name), dtype_key(dtype)
    if key is None or precision not in PEAK_FLOPS[key]:
        return None
    return PEAK_FLOPS[key][precision], (
        f"datasheet: {device_name!r} -> {key} {precision} dense peak (no sparsity)")


def peak_flops_per_device(device: torch.device | str,
                          dtype: torch.dtype | str = torch.bfloat16) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from)."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        found = peak_flops_for_name(name, dtype)
        if found is not None:
            return found
        value = measure_matmul_peak(device, dtype)
        return value, f"measured: unknown GPU {name!r}, best {dtype_key(dtype)} matmul rate"
    value = measure_matmul_peak(device, dtype)
    return value, (f"measured on CPU ({torch.get_num_threads()} threads): best "
                   f"{dtype_key(dtype)} {_BENCH_N['cpu']}^3 matmul rate, not a datasheet peak")


def measure_matmul_peak(device: torch.device, dtype: torch.dtype | str) -> float:
    """Best observed 2n³/t over ~0.25 s of n x n matmuls (cached per device, dtype, threads)."""
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16,
                   "fp32": torch.float32, "tf32": torch.float32}[dtype_key(dtype)]
    cache_key = (f"{device}:{torch_dtype}", torch.get_num_threads())
    if cache_key not in _measured_peaks:
        _measured_peaks[cache_key] = _time_matmuls(device, torch_dtype)
    return _measured_peaks[cache_key]


def _time_matmuls(device: torch.device, dtype: torch.dtype) -> float:
    n = _BENCH_N.get(device.type, _BENCH_N["cpu"])
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    _synchronize(device, torch.mm(a, b))  # warm-up: thread pool, kernel selection
    best, deadline = 0.0, time.perf_counter() + _BENCH_SECONDS
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        _synchronize(device, torch.mm(a, b))
        best = max(best, 2 * n ** 3 / (time.perf_counter() - start))
    return best


def _synchronize(device: torch.device, _result: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tflops_per_device(flops_per_iter: float, iter_time_s: float, world_size: int) -> float:
    """Achieved TFLOP/s per device = FLOPs / (iteration time · 1e12 · world size)."""
    _check_positive(iter_time_s=iter_time_s, world_size=world_size)
    return flops_per_iter / (iter_time_s * 1e12 * world_size)


def mfu(flops_per_iter: float, iter_time_s: float, world_size: int, peak: float) -> float:
    """Model FLOPs utilisation = FLOPs / (iteration time · world size · peak per device)."""
    _check_positive(iter_time_s=iter_time_s, world_size=world_size, peak=peak)
    return flops_per_iter / (iter_time_s * world_size * peak)


def _check_positive(**values: float) -> None:
    for key, value in values.items():
        if not value > 0:
            raise ValueError(f"{key}={value!r}: must be > 0")

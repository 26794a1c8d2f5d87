"""Peak FLOP/s per device and MFU.

GPU peaks are datasheet dense tensor-core figures (no 2:4 sparsity), looked up by the CUDA
device name; each table row names its datasheet. A CPU (or an unknown GPU) has no honest
datasheet number, so its peak is a calibrated matmul rate, measured once per machine and
cached under the user's cache dir (engine/metrics/calibration.py); the source string says
so, and the driver shows and logs it.
"""
from __future__ import annotations

import torch

from .calibration import calibrated_peak

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

# Where each row comes from (the sparse figures these documents also print are halved).
PEAK_SOURCES: dict[str, str] = {
    "B200": "NVIDIA HGX B200 datasheet (per GPU, dense)",
    "H200 SXM": "NVIDIA H200 Tensor Core GPU datasheet, H200 SXM column",
    "H100 SXM": "NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column",
    "H100 NVL": "NVIDIA H100 Tensor Core GPU datasheet, H100 NVL column",
    "H100 PCIe": "NVIDIA H100 PCIe product brief",
    "H20": "NVIDIA H20 product brief",
    "A100": "NVIDIA A100 Tensor Core GPU datasheet (SXM and PCIe)",
    "L40S": "NVIDIA L40S datasheet",
    "L40": "NVIDIA L40 datasheet",
    "L4": "NVIDIA L4 Tensor Core GPU datasheet",
    "RTX 4090": "NVIDIA Ada Lovelace architecture whitepaper, appendix A (GeForce RTX 4090)",
    "V100": "NVIDIA Tesla V100 datasheet, SXM2 column",
    "MI300X": "AMD Instinct MI300X accelerator data sheet",
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
        f"datasheet: {device_name!r} -> {key} {precision} dense peak (no sparsity), "
        f"{PEAK_SOURCES[key]}")


def peak_flops_per_device(device: torch.device | str, dtype: torch.dtype | str = torch.bfloat16,
                          cache_dir: str | None = None) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from).

    A GPU in the datasheet table gets its datasheet figure; anything else a calibrated
    peak (cached per machine in cache_dir, default the user's cache dir)."""
    device = torch.device(device)
    if device.type == "cuda":
        found = peak_flops_for_name(torch.cuda.get_device_name(device), dtype)
        if found is not None:
            return found
    calibration = calibrated_peak(device, dtype_key(dtype), cache_dir)
    return calibration.flops, calibration.describe()


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

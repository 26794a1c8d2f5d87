"""A calibrated matmul peak for devices with no datasheet figure (CPUs, unknown GPUs).

Measured once per machine, device, dtype and thread count, then cached in the user's
cache dir (`$FOLDMOE_CACHE_DIR`, else `$XDG_CACHE_HOME/foldmoe`, else `~/.cache/foldmoe`),
so every later run divides by the same number: a peak measured anew in each run moved
with the machine's load (0.004 to 0.10 TFLOP/s across runs on a shared 2-core box) and
made MFU incomparable between runs. Workers starting together on one machine take a file
lock, so one measures while the others wait and then read its result (several measuring
at once would slow each other down and cache a low peak).
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import platform
import time
from dataclasses import dataclass

import torch

CACHE_FILE = "peak_flops.json"
BENCH_N = {"cpu": 1024, "cuda": 4096}   # large enough to reach the GEMM plateau on each
BENCH_SECONDS = 1.5                     # best-of window: long enough to find a quiet moment
_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
                 "tf32": torch.float32}


@dataclass(frozen=True)
class Calibration:
    flops: float
    key: str
    measured_at: str
    path: str

    def describe(self) -> str:
        return (f"calibrated peak ({self.key}; best {BENCH_SECONDS:g} s matmul rate, "
                f"measured {self.measured_at}, cached in {self.path})")


def cache_dir() -> str:
    explicit = os.environ.get("FOLDMOE_CACHE_DIR")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "foldmoe")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def calibration_key(device: torch.device, precision: str) -> str:
    """Machine, device, dtype and threads: what the measured rate depends on."""
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        what = f"{cpu_model()}, {torch.get_num_threads()} threads"
    return f"{platform.node()}: {device.type} {what}, {precision}, torch {torch.__version__}"


def calibrated_peak(device: torch.device, precision: str, directory: str | None = None) -> Calibration:
    """The cached calibration for this key, measuring it (under a file lock) if absent."""
    directory = directory or cache_dir()
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, CACHE_FILE)
    key = calibration_key(device, precision)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        table = _read_table(path)
        if key not in table:
            flops = measure_matmul_rate(device, _TORCH_DTYPES[precision])
            stamp = datetime.datetime.now().isoformat(timespec="minutes")
            table[key] = {"flops": flops, "measured_at": stamp}
            _write_table(path, table)
    entry = table[key]
    return Calibration(float(entry["flops"]), key, entry["measured_at"], path)


def _read_table(path: str) -> dict:
    """A missing or damaged cache file is an empty table (it is re-measured and rewritten)."""
    try:
        with open(path, encoding="utf-8") as handle:
            table = json.load(handle)
    except (OSError, ValueError):
        return {}
    if not isinstance(table, dict):
        return {}
    return {k: v for k, v in table.items()
            if isinstance(v, dict) and isinstance(v.get("flops"), (int, float)) and v["flops"] > 0}


def _write_table(path: str, table: dict) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(table, handle, indent=1, sort_keys=True)
    os.replace(tmp, path)


def measure_matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """Best observed 2n³/t of n x n matmuls over BENCH_SECONDS."""
    n = BENCH_N.get(device.type, BENCH_N["cpu"])
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    _synchronize(device, torch.mm(a, b))  # warm-up: thread pool, kernel selection
    best, deadline = 0.0, time.perf_counter() + BENCH_SECONDS
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        _synchronize(device, torch.mm(a, b))
        best = max(best, 2 * n ** 3 / (time.perf_counter() - start))
    return best


def _synchronize(device: torch.device, _result: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

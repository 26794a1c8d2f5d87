"""Device figures for the memory model and the planner: one table, with sources.

Sources (vendor datasheets; "GB" = 10^9 bytes):
- H100 SXM5: NVIDIA H100 Tensor Core GPU datasheet (2023): 1,979 TFLOP/s bf16 with 2:4
  sparsity, i.e. 989.5 dense; 80 GB HBM3 at 3.35 TB/s; NVLink 4 900 GB/s total =
  450 GB/s per direction. Network: DGX H100 user guide, 8x ConnectX-7 400 Gb/s, one per GPU.
- H200 SXM: NVIDIA H200 datasheet (2024): same tensor cores as H100 (989.5 dense bf16),
  141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s total; DGX H200: 400 Gb/s per GPU.
- A100 SXM4 80 GB: NVIDIA A100 datasheet (2021): 312 TFLOP/s bf16 dense, 80 GB HBM2e at
  2.039 TB/s, NVLink 3 600 GB/s total (300 per direction); DGX A100: 200 Gb/s HDR per GPU.
- B200: NVIDIA DGX B200 datasheet (2024): 72 PFLOP/s FP8 training for 8 GPUs = 4.5 PF
  sparse-free FP8 per GPU, 2.25 PF dense bf16; 1,440 GB for 8 GPUs = 180 GB each (192 GB
  physical HBM3e), 8 TB/s; NVLink 5 1.8 TB/s total (900 per direction); 400 Gb/s per GPU.
Usable memory is a little more than the nominal GB figure (an 80 GB H100 reports about
85.0e9 bytes to CUDA), so the nominal figure leaves roughly 5% for the CUDA context, NCCL
buffers and allocator fragmentation, which the memory model does not count.
The CPU row is a placeholder for `foldmoe plan --gpu cpu`; `--calibrate` replaces its
rates by measured ones (engine/planner/calibrate.py).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

GB = 10**9


@dataclass(frozen=True)
class Device:
    name: str
    peak_flops: float          # dense bf16 FLOP/s (fp32 on CPU)
    memory_bytes: int
    hbm_bytes_per_s: float
    intra_node_bytes_per_s: float   # per GPU per direction (NVLink); shared memory on CPU
    inter_node_bytes_per_s: float   # per GPU per direction (InfiniBand / RoCE NIC)
    source: str

    def with_rates(self, **rates: float) -> "Device":
        return replace(self, **rates)


DEVICES: dict[str, Device] = {
    "h100": Device("H100 SXM 80 GB", 989.5e12, 80 * GB, 3.35e12, 450e9, 400e9 / 8,
                   "NVIDIA H100 datasheet; DGX H100 user guide"),
    "h200": Device("H200 SXM 141 GB", 989.5e12, 141 * GB, 4.8e12, 450e9, 400e9 / 8,
                   "NVIDIA H200 datasheet; DGX H200"),
    "a100": Device("A100 SXM 80 GB", 312e12, 80 * GB, 2.039e12, 300e9, 200e9 / 8,
                   "NVIDIA A100 datasheet; DGX A100"),
    "b200": Device("B200 180 GB", 2250e12, 180 * GB, 8e12, 900e9, 400e9 / 8,
                   "NVIDIA DGX B200 datasheet"),
    "cpu": Device("CPU core (nominal; use --calibrate)", 50e9, 4 * GB, 10e9, 2e9, 1e9,
                  "nominal figures, not a datasheet: calibrate on the machine"),
}
GPU_KINDS = tuple(k for k in DEVICES if k != "cpu")


def device(kind: str) -> Device:
    if kind not in DEVICES:
        raise KeyError(f"unknown device {kind!r}; known: {sorted(DEVICES)}")
    return DEVICES[kind]

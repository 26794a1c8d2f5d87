"""Training throughput metrics: model FLOPs per iteration, device peaks, MFU."""
from .flops import model_flops_per_iteration
from .peak import PEAK_FLOPS, mfu, peak_flops_for_name, peak_flops_per_device, tflops_per_device

__all__ = ["model_flops_per_iteration", "PEAK_FLOPS", "mfu", "peak_flops_for_name",
           "peak_flops_per_device", "tflops_per_device"]

"""Training throughput metrics: model FLOPs per iteration, device peaks, MFU.

Names are imported on first use (PEP 562), so `engine.metrics.flops` (pure arithmetic)
loads without torch for the planner.
"""
from importlib import import_module

_SOURCES = {"model_flops_per_iteration": "flops", "PEAK_FLOPS": "peak", "mfu": "peak",
            "peak_flops_for_name": "peak", "peak_flops_per_device": "peak",
            "tflops_per_device": "peak"}

__all__ = sorted(_SOURCES)


def __getattr__(name: str):
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_SOURCES[name]}", __name__), name)
    globals()[name] = value
    return value

"""Pipeline parallelism: layer split, schedules as action lists, p2p, executor, bubble.

Names are imported on first use (PEP 562), so the pure-Python parts (`split`, `schedules`,
`bubble`) load without torch: the config layer and the planner use them at validate time.
"""
from importlib import import_module

_SOURCES = {
    "TimedAction": "bubble", "bubble_fraction": "bubble", "theoretical_bubble": "bubble",
    "PipelineExecutor": "executor",
    "Action": "schedules", "ScheduleError": "schedules", "build_schedule": "schedules",
    "chunks_of_rank": "schedules", "format_actions": "schedules", "gpipe": "schedules",
    "interleaved_1f1b": "schedules", "one_f_one_b": "schedules",
    "split_layers": "split",
    "check_schedule": "verify", "peak_in_flight": "verify", "simulate": "verify",
}

__all__ = sorted(_SOURCES)


def __getattr__(name: str):
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_SOURCES[name]}", __name__), name)
    globals()[name] = value
    return value

"""Pipeline parallelism: layer split, schedules as action lists, p2p, executor, bubble."""
from .bubble import TimedAction, bubble_fraction, theoretical_bubble
from .executor import PipelineExecutor
from .schedules import (Action, ScheduleError, build_schedule, chunks_of_rank, format_actions, gpipe,
                        interleaved_1f1b, one_f_one_b)
from .split import split_layers
from .verify import check_schedule, peak_in_flight, simulate

__all__ = ["Action", "PipelineExecutor", "ScheduleError", "TimedAction", "bubble_fraction",
           "build_schedule", "check_schedule", "chunks_of_rank", "format_actions", "gpipe",
           "interleaved_1f1b", "one_f_one_b", "peak_in_flight", "simulate", "split_layers",
           "theoretical_bubble"]

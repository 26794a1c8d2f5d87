"""Shared helpers of the benchmark scripts: one thread, interleaved rounds, medians,
a world-1 (or N-rank) gloo group, a plain-text table and a JSON record.

Interleaving (A, B, C, then B, C, A, ...) spreads slow drifts of a shared machine over all
candidates; the ratio is taken per round and its median reported, so one noisy round
cannot move the figure.
"""
from __future__ import annotations

import argparse

import datetime
import json
import os
import platform
import resource
import socket
import statistics
import time
from typing import Callable

import torch
import torch.distributed as dist

from engine.train.host_allocator import retain_freed_host_memory

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def one_thread() -> None:
    """One torch thread, and the host allocator settings of a foldmoe CPU worker
    (engine/train/host_allocator.py; FOLDMOE_HOST_MALLOC=default measures without them)."""
    retain_freed_host_memory()
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:   # may only be set once per process, before inter-op work
        pass


def rounds_args(doc: str, rounds: int = 9) -> argparse.Namespace:
    """`--rounds N --json PATH`, parsed, with torch held to one thread (every benchmark here
    compares candidates side by side on one core)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    one_thread()
    return args


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_single_process_group() -> None:
    """A world-1 gloo group, so the engine's mesh code runs unchanged in one process."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}",
                                rank=0, world_size=1)


def interleaved_rounds(candidates: dict[str, Callable[[], None]], rounds: int,
                       warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of every candidate, one call each per round, order rotated per round."""
    names = list(candidates)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            start = time.perf_counter()
            candidates[name]()
            elapsed = time.perf_counter() - start
            if r >= warmup:
                times[name].append(elapsed)
    return times


def median_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of num[r] / den[r]."""
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine() -> dict:
    return {"cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            # other processes share the cores: the 1/5/15-minute load when the figures were written
            "load_average": list(os.getloadavg()),
            # torch's switch for 2 MB pages on CPU allocations >= 2 MB (read once, at import)
            "thp_mem_alloc_enable": os.environ.get("THP_MEM_ALLOC_ENABLE"),
            "host_allocator": retain_freed_host_memory(),
            # the process's peak resident memory so far (Linux reports KiB)
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.4g}"
    return str(value)


def write_json(name: str, payload: dict, path: str | None = None) -> str:
    path = path or os.path.join(RESULTS_DIR, f"{name}.json")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    record = {"benchmark": name, "date": datetime.date.today().isoformat(), "machine": machine(),
              **payload}
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    print(f"\nwrote {path}")
    return path

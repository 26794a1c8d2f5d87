"""The job's event logs: one JSON object per line, each file appended by one writer.

`events.jsonl` is written by rank 0 of the worker group ("start" when a group comes up,
"step" after every optimizer step), under Ray Train and torchrun alike; `controller.jsonl`
by the Ray Train controller's callback ("failure" when a worker group fails); `faults.jsonl`
by the driver's watchdog ("hang", "straggler": orchestrator/watchdog.py). The driver
is the only reader: it turns events into MLflow records, the progress display and the
--metrics-jsonl file. Files survive worker-group restarts and need no live connection.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any


def _finite(value: Any) -> Any:
    """JSON has no NaN/inf; keep them readable as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class EventWriter:
    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

    def write(self, event_type: str, **fields: Any) -> None:
        event = {"type": event_type, "time": fields.pop("time", time.time())}
        event.update({k: _finite(v) for k, v in fields.items()})
        line = json.dumps(event, default=str) + "\n"
        # One write() of one line in append mode: a reader never sees half an event
        # followed by another writer's bytes.
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()


class EventTail:
    """Reads the events appended since the last call; ignores a trailing partial line."""

    def __init__(self, path: str):
        self.path = path
        self._offset = 0

    def read(self) -> list[dict]:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self._offset += end
        return [json.loads(line) for line in data[:end].splitlines() if line.strip()]

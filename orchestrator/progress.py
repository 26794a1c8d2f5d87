"""Driver-side progress: a rich live bar on a terminal, plain log lines otherwise
(`ray job logs`, CI), both showing step, loss, tokens/s, MFU and ETA."""
from __future__ import annotations

import sys
import time


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class ProgressDisplay:
    def __init__(self, total_steps: int, *, live: bool | None = None, min_interval_s: float = 2.0):
        self.total = total_steps
        self.live = sys.stdout.isatty() if live is None else live
        self.min_interval_s = min_interval_s
        self._last_print = 0.0
        self._step_times: list[float] = []
        self._progress = None
        self._task = None

    def start(self) -> None:
        if not self.live:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self._progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tok_s]} tok/s"),
            TextColumn("MFU {task.fields[mfu]}"), TextColumn("ETA {task.fields[eta]}"),
            refresh_per_second=4)
        self._task = self._progress.add_task("train", total=self.total, loss="-", tok_s="-",
                                             mfu="-", eta="?")
        self._progress.start()

    def eta_s(self) -> float | None:
        if not self._step_times:
            return None
        recent = self._step_times[-10:]
        return sum(recent) / len(recent)

    def update(self, record: dict) -> None:
        done = record["step"] + 1
        self._step_times.append(record.get("step_time_s", 0.0))
        per_step = self.eta_s()
        eta = _eta(per_step * (self.total - done) if per_step is not None else None)
        fields = {"loss": f"{record.get('loss', float('nan')):.4f}",
                  "tok_s": f"{record.get('tokens_per_s', 0.0):,.0f}",
                  "mfu": f"{100 * record.get('mfu', 0.0):.2f}%", "eta": eta}
        if self._progress is not None:
            self._progress.update(self._task, completed=done, **fields)
            return
        now = time.monotonic()
        if now - self._last_print >= self.min_interval_s or done == self.total:
            self._last_print = now
            print(f"step {done}/{self.total} loss {fields['loss']} tokens/s {fields['tok_s']} "
                  f"MFU {fields['mfu']} ETA {eta}", flush=True)

    def note(self, message: str) -> None:
        if self._progress is not None:
            self._progress.console.print(message)
        else:
            print(message, flush=True)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

"""Driver-side progress: the phases before the first step, each with its elapsed time, then
a rich live bar on a terminal (plain log lines otherwise: `ray job logs`, CI) showing step,
loss, tokens/s, MFU and ETA, and a summary table at the end.

The bar appears with the first completed step: before it there is nothing to count, and a
bar at 0/N with "ETA ?" for the 30 s a Ray worker group takes to come up says nothing. A
phase that lasts long prints a "still ..." line every `heartbeat_s` with what it waits for.
"""
from __future__ import annotations

import sys
import time


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class ProgressDisplay:
    def __init__(self, total_steps: int, *, live: bool | None = None, min_interval_s: float = 2.0,
                 heartbeat_s: float = 30.0):
        self.total = total_steps
        self.live = sys.stdout.isatty() if live is None else live
        self.min_interval_s = min_interval_s
        self.heartbeat_s = heartbeat_s
        self.stderr = sys.stderr      # the driver points this at the terminal while Ray's fd 2 is captured
        self._last_print = 0.0
        self._step_times: list[float] = []
        self._last_record: tuple[int, float | None] | None = None   # (step, time) of the last
        self._progress = None
        self._task = None
        self._status = None
        self._phase: tuple[str, float, float] | None = None   # (name, started, last heartbeat)

    # ---------------------------------------------------------------- phases
    def phase(self, name: str, started: float | None = None) -> None:
        """Ends the running phase (printing its time) and starts `name`."""
        now = time.time()
        self.end_phase(now if started is None else started)
        self._phase = (name, now if started is None else started, now)
        if self.live and self._progress is None:
            from rich.live import Live
            from rich.spinner import Spinner

            # redirect_stderr=False: stderr is Ray's log file while the job runs (ray_output.py)
            self._status = Live(Spinner("dots", f"{name} ..."), transient=True,
                                redirect_stderr=False, refresh_per_second=8)
            self._status.start()
        elif not self.live:
            print(f"{name} ...", flush=True)

    @property
    def current_phase(self) -> str | None:
        return self._phase[0] if self._phase else None

    def end_phase(self, ended: float | None = None, suffix: str = "") -> None:
        if self._phase is None:
            return
        name, started, _ = self._phase
        self._phase = None
        if self._status is not None:
            self._status.stop()
            self._status = None
        self.note(f"  {name}: {max(0.0, (ended or time.time()) - started):.1f} s{suffix}")

    def tick(self, waiting_for=None) -> None:
        """Called while the driver waits: refreshes the live status every second, or prints
        a heartbeat line. waiting_for: a callable giving what the phase waits for (called
        only then: it may ask the cluster)."""
        if self._phase is None:
            return
        name, started, last = self._phase
        now = time.time()
        due = now - last >= (1.0 if self._status is not None else self.heartbeat_s)
        if not due:
            return
        self._phase = (name, started, now)
        detail = waiting_for() if waiting_for is not None else None
        detail = f" ({detail})" if detail else ""
        if self._status is not None:
            from rich.spinner import Spinner

            self._status.update(Spinner("dots", f"{name} ... {now - started:.0f} s{detail}"))
        else:
            print(f"still {name} after {now - started:.0f} s{detail}", flush=True)

    # ---------------------------------------------------------------- steps
    def _start_bar(self, done: int, fields: dict) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        # redirect_stderr=False: stderr is Ray's log file while the job runs (ray_output.py).
        self._progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tok_s]} tok/s"),
            TextColumn("MFU {task.fields[mfu]}"), TextColumn("ETA {task.fields[eta]}"),
            refresh_per_second=4, redirect_stderr=False)
        self._task = self._progress.add_task("train", total=self.total, completed=done, **fields)
        self._progress.start()

    def new_group(self) -> None:
        """A worker group starts: its first step's wall time since the last record is the
        restart, not a step."""
        self._last_record = None

    def _seconds_per_step(self, record: dict) -> float:
        """Wall time since the previous step's record: the step with its data, reporting,
        evaluation and checkpoint stalls, which step_time_s leaves out (the ETA read short);
        step_time_s for a group's first step."""
        previous, self._last_record = self._last_record, (record["step"], record.get("time"))
        if previous is not None and previous[1] is not None and record.get("time") is not None \
                and record["step"] > previous[0]:
            return (record["time"] - previous[1]) / (record["step"] - previous[0])
        return record.get("step_time_s", 0.0)

    def eta_s(self) -> float | None:
        if not self._step_times:
            return None
        recent = self._step_times[-10:]
        return sum(recent) / len(recent)

    def update(self, record: dict) -> None:
        done = record["step"] + 1
        self._step_times.append(self._seconds_per_step(record))
        per_step = self.eta_s()
        eta = _eta(per_step * (self.total - done) if per_step is not None else None)
        fields = {"loss": f"{record.get('loss', float('nan')):.4f}",
                  "tok_s": f"{record.get('tokens_per_s', 0.0):,.0f}",
                  "mfu": f"{100 * record.get('mfu', 0.0):.2f}%", "eta": eta}
        if self.live:
            if self._progress is None:
                self._start_bar(done, fields)
            self._progress.update(self._task, completed=done, **fields)
            return
        now = time.monotonic()
        if now - self._last_print >= self.min_interval_s or done == self.total:
            self._last_print = now
            print(f"step {done}/{self.total} loss {fields['loss']} tokens/s {fields['tok_s']} "
                  f"MFU {fields['mfu']} ETA {eta}", flush=True)

    # ---------------------------------------------------------------- messages
    def note(self, message: str) -> None:
        if self._progress is not None:
            self._progress.console.print(message, markup=False, highlight=False)
        else:
            print(message, flush=True)

    def warn(self, message: str) -> None:
        text = message if message.startswith("warning") else f"warning: {message}"
        live = self._progress or self._status
        if live is not None:
            live.console.print(text, markup=False, highlight=False, style="yellow")
        else:
            print(text, file=self.stderr, flush=True)

    def table(self, title: str, rows: list[tuple[str, str]]) -> None:
        """The end-of-job summary: a rich table on a terminal, aligned lines otherwise."""
        if self.live:
            from rich.console import Console
            from rich.table import Table

            table = Table(title=title, show_header=False, title_justify="left")
            table.add_column(style="bold")
            table.add_column(overflow="fold")
            for key, value in rows:
                table.add_row(key, value)
            Console().print(table)
            return
        width = max(len(key) for key, _ in rows)
        print("\n".join([title] + [f"  {key:<{width}}  {value}" for key, value in rows]), flush=True)

    def close_bar(self) -> None:
        """The steps are over: later phases show as status lines again."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def stop(self) -> None:
        self.end_phase()
        self.close_bar()

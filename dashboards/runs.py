"""Loading runs for the review report: an MLflow run id, or a --metrics-jsonl file.

Either way a run becomes per-step records under the grouped metric names of
orchestrator/metric_names.py (`train/loss`, `comm/bytes_ep`, ...) plus `step` and `time`
(wall clock of the step). Steps re-run after a restart count once: the last one wins.
Problems a user can cause (a wrong run id, an unreachable store, a missing file) raise
ReportError with a one-line message.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from orchestrator.metric_names import grouped_metrics

SQLITE = "sqlite:///"
NOT_STEP_METRICS = ("system/", "job/")     # MLflow's system monitor, end-of-job figures


class ReportError(Exception):
    """One line for the user: which input, and what is wrong with it."""


@dataclass
class Run:
    label: str                                   # short name in legends and tables
    source: str                                  # the run id or the file
    records: list[dict]                          # by step: {"step", "time", grouped names...}
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        pairs = [(r["step"], r[key]) for r in self.records if isinstance(r.get(key), (int, float))]
        return [s for s, _ in pairs], [v for _, v in pairs]

    def keys(self) -> set[str]:
        return {k for r in self.records for k in r}


def load_run(source: str, tracking_uri: str | None = None) -> Run:
    if source.endswith(".jsonl") or os.path.isfile(source):
        return load_jsonl(source)
    return load_mlflow(source, tracking_uri)


def load_jsonl(path: str) -> Run:
    by_step: dict[int, dict] = {}
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    flat = json.loads(line)
                    by_step[int(flat["step"])] = {"step": int(flat["step"]), "time": flat.get("time"),
                                                  **grouped_metrics(flat)}
                except (ValueError, KeyError, TypeError):
                    raise ReportError(f"{path}: line {number} is not a step record") from None
    except OSError as err:
        raise ReportError(f"{path}: cannot read ({err.strerror})") from None
    return Run(label=os.path.splitext(os.path.basename(path))[0], source=path,
               records=[by_step[s] for s in sorted(by_step)])


def _client(tracking_uri: str | None):
    from orchestrator.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith(SQLITE) and not os.path.isfile(uri[len(SQLITE):]):
        # MlflowClient would silently create an empty database there.
        raise ReportError(f"tracking store {uri}: no such database file")
    if uri.startswith(("http://", "https://")):
        _check_reachable(uri)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri), uri


def _check_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """One request to the server's health endpoint: MLflow's client would retry a refused
    connection for minutes and then print a page of traceback."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return          # it answers (an auth proxy, an older server): let MLflow talk to it
    except (OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise ReportError(f"tracking store {uri}: unreachable ({reason})") from None


def load_mlflow(run_id: str, tracking_uri: str | None) -> Run:
    from mlflow.exceptions import MlflowException

    client, uri = _client(tracking_uri)
    try:
        run = client.get_run(run_id)
        keys = [k for k in run.data.metrics if not k.startswith(NOT_STEP_METRICS)]
        histories = {key: client.get_metric_history(run_id, key) for key in keys}
    except MlflowException as err:
        if getattr(err, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            raise ReportError(f"run {run_id}: no such MLflow run at {uri}") from None
        raise ReportError(f"run {run_id}: {_first_line(err)} ({uri})") from None
    except Exception as err:  # noqa: BLE001 - connection refused, DNS, TLS: one line
        raise ReportError(f"tracking store {uri}: unreachable ({type(err).__name__}: "
                          f"{_first_line(err)})") from None
    by_step: dict[int, dict] = {}
    for key, history in histories.items():
        for m in sorted(history, key=lambda m: m.timestamp):   # a re-run step: last wins
            record = by_step.setdefault(m.step, {"step": m.step})
            record[key] = m.value
            if key == "train/loss":
                record["time"] = m.timestamp / 1000
    records = [by_step[s] for s in sorted(by_step) if "train/loss" in by_step[s]]
    label = run.info.run_name or run_id[:8]
    return Run(label=f"{label} ({run_id[:8]})", source=run_id, records=records,
               params=dict(run.data.params), tags=dict(run.data.tags))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__

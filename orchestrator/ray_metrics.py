"""The job's live figures as Ray application metrics (`ray.util.metrics`), so they reach the
Prometheus endpoint of the Ray node's metrics agent and the Grafana dashboard shipped in
dashboards/grafana_foldmoe.json.

Set by the driver (a Ray driver under the Ray launcher) from the same step events that go
to MLflow: one writer, every restart seen, nothing added to the workers' hot loop. Ray
prefixes application metrics with `ray_` in Prometheus (`foldmoe_loss` is scraped as
`ray_foldmoe_loss`); samples reach the endpoint within Ray's report interval (~10 s).
"""
from __future__ import annotations

# name -> (description, step-record key or None for a value set by name)
GAUGES: dict[str, tuple[str, str | None]] = {
    "foldmoe_loss": ("Training loss of the latest step", "loss"),
    "foldmoe_step_time_seconds": ("Wall time of the latest optimizer step", "step_time_s"),
    "foldmoe_tokens_per_second": ("Training tokens per second, all workers", "tokens_per_s"),
    "foldmoe_mfu": ("Model FLOPs utilisation of the latest step (0-1)", "mfu"),
    "foldmoe_restarts": ("Worker-group restarts so far in this job", "restarts"),
    "foldmoe_steps_completed": ("Optimizer steps completed (latest step + 1)", None),
    "foldmoe_world_size": ("Workers in the current worker group", "world_size"),
}
TAG_KEYS = ("job", "run")
PROMETHEUS_PREFIX = "ray_"


def prometheus_names() -> set[str]:
    return {PROMETHEUS_PREFIX + name for name in GAUGES}


class RayMetricsExporter:
    def __init__(self, job: str, run: str):
        from ray.util.metrics import Gauge

        self.tags = {"job": job, "run": run}
        self.gauges = {name: Gauge(name, description=desc, tag_keys=TAG_KEYS)
                       for name, (desc, _) in GAUGES.items()}

    def step(self, record: dict) -> None:
        for name, (_, key) in GAUGES.items():
            value = record["step"] + 1 if key is None else record.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.gauges[name].set(float(value), tags=self.tags)

"""The Grafana dashboard shipped next to Ray's: valid JSON whose queries name exactly the
metrics the driver exports (tests/orchestrator/test_ray_jobs.py checks them against a
running job's Prometheus endpoint)."""
from __future__ import annotations

import json
import pathlib
import re

from orchestrator.ray_metrics import prometheus_names

GRAFANA = pathlib.Path(__file__).resolve().parents[2] / "dashboards" / "grafana_foldmoe.json"


def test_every_exported_metric_has_a_panel_and_every_query_an_exporter():
    doc = json.loads(GRAFANA.read_text())
    exprs = [t["expr"] for panel in doc["panels"] for t in panel["targets"]]
    named = {name for expr in exprs for name in re.findall(r"\bray_foldmoe_\w+", expr)}
    assert named == prometheus_names()
    assert all(panel["datasource"]["uid"] == "${datasource}" for panel in doc["panels"])
    assert len({panel["id"] for panel in doc["panels"]}) == len(doc["panels"])

"""dashboards.report from a metrics JSONL and from an MLflow run (hand-computed figures)."""
from __future__ import annotations

import json

import pytest

from dashboards.report import load_jsonl, main, render_markdown, sparkline, summarize


def _records():
    # Steps 0..3, then a restart replays step 3 (last wins) and runs step 4.
    rows = []
    for step, loss, tok_s in [(0, 6.0, 100.0), (1, 5.0, 400.0), (2, 4.0, 600.0), (3, 3.5, 500.0)]:
        rows.append({"step": step, "loss": loss, "tokens_per_s": tok_s, "mfu": 0.02,
                     "step_time_s": 1.0, "load_imbalance": 1.5, "dropped_token_fraction": 0.0,
                     "comm_bytes_ep": 2048.0, "comm_bytes_dp": 1024.0, "restarts": 0})
    rows.append(dict(rows[-1], restarts=1, tokens_per_s=300.0))
    rows.append(dict(rows[-1], step=4, loss=3.0, load_imbalance=2.5, restarts=1))
    return rows


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _records()))
    return path


def test_replayed_steps_count_once_last_wins(jsonl):
    records = load_jsonl(str(jsonl))
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    assert records[3]["tokens_per_s"] == 300.0


def test_summary_figures_by_hand(jsonl):
    s = summarize(load_jsonl(str(jsonl)))
    assert s["restarts"] == 1
    assert s["loss"]["first"] == 6.0 and s["loss"]["last"] == 3.0 and s["loss"]["min"] == 3.0
    # Step 0 is warm-up: tokens/s over steps 1..4 = (400 + 600 + 300 + 300) / 4 = 400.
    assert s["throughput"]["tokens_per_s"]["mean"] == pytest.approx(400.0)
    # Imbalance over all 5 steps: (1.5 * 4 + 2.5) / 5 = 1.7, max 2.5.
    assert s["moe"]["load_imbalance"]["mean"] == pytest.approx(1.7)
    assert s["moe"]["load_imbalance"]["max"] == 2.5
    assert set(s["comm_bytes_per_step"]) == {"dp", "ep"}
    assert s["comm_bytes_per_step"]["ep"]["mean"] == 2048.0


def test_markdown_and_html_files(jsonl, tmp_path):
    out, page = tmp_path / "r.md", tmp_path / "r.html"
    assert main([str(jsonl), "--out", str(out), "--html", str(page)]) == 0
    md = out.read_text()
    for heading in ("## Loss", "## Throughput", "## MoE", "## Communication per step by axis"):
        assert heading in md
    assert "| ep | 2.00 KiB |" in md and "| dp | 1.00 KiB |" in md
    assert "| tokens_per_s | 400 |" in md
    html = page.read_text()
    assert html.startswith("<!doctype html>") and "<svg" in html and "<table>" in html


def test_sparkline_spans_low_to_high():
    # (v - lo) / span * 8 levels: 0 -> ▁, 4 -> ▅, 8 clipped to 7 -> █
    assert sparkline([1.0, 2.0, 3.0]) == "▁▅█"
    assert render_markdown([], "empty").endswith("No step records found.\n")


def test_report_from_an_mlflow_run(tmp_path):
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("report-test"))
    client.log_batch(run.info.run_id, metrics=[
        Metric(key, value, 1000 + step, step)
        for step, loss in enumerate([5.0, 4.0, 3.0])
        for key, value in (("loss", loss), ("tokens_per_s", 100.0 * (step + 1)),
                           ("comm_bytes_ep", 4096.0))])
    client.log_param(run.info.run_id, "layout.ep", "4")
    out = tmp_path / "r.md"
    assert main([run.info.run_id, "--tracking-uri", uri, "--out", str(out)]) == 0
    md = out.read_text()
    assert "Steps 0..2 (3 records)" in md and "ep=4" in md
    assert "| 5 | 3 | 3 |" in md            # first, last, min loss
    assert "| tokens_per_s | 250 |" in md   # mean of 200 and 300 (step 0 = warm-up)

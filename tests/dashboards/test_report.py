"""dashboards.report: runs from --metrics-jsonl files and MLflow, hand-computed figures, the
config-diff table, one-line input errors, the Markdown linking its PNGs, and the HTML page
of a two-run comparison rendered by headless Chromium with every plot area drawn."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from dashboards.plots import DPI, HEIGHT_IN, PLOTS, WIDTH_IN
from dashboards.report import config_diff, figures_table, main
from dashboards.runs import Run, load_jsonl

from ..orchestrator.jobs import free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _record(step, loss, tok_s, restarts=0, dropped=0.0, layer_load=1.5):
    val = {"val_loss": loss + 0.25} if step % 2 else {}     # train.eval_every: 2
    return {**val, "step": step, "time": 1000.0 + 10 * step + 30 * restarts, "loss": loss,
            "tokens_per_s": tok_s, "mfu": tok_s / 1e5, "step_time_s": 1.0, "time_data_s": 0.05,
            "time_forward_backward_s": 0.8, "time_grad_sync_s": 0.05, "time_optimizer_s": 0.07,
            "time_metrics_s": 0.03, "load_imbalance": layer_load, "dropped_token_fraction": dropped,
            "load_imbalance_by_layer": {"1": layer_load, "2": layer_load + 0.5, "3": 1.1},
            "comm_bytes_ep": 2048.0, "comm_bytes_dp": 1024.0, "restarts": restarts, "world_size": 4}


def _run_a():
    # Steps 0..3, then a restart replays step 3 (last wins) and runs steps 4, 5.
    rows = [_record(s, 6.0 - s, t) for s, t in [(0, 100.0), (1, 400.0), (2, 600.0), (3, 500.0)]]
    rows += [{**_record(3, 3.0, 300.0, restarts=1), "recovery_s": 30.0},   # the new group's first
             _record(4, 2.0, 300.0, restarts=1, layer_load=2.5),
             _record(5, 1.5, 350.0, restarts=1)]
    return rows


def _run_b():
    return [_record(s, 6.5 - 0.8 * s, 200.0 + 10 * s, dropped=0.02 * s, layer_load=1.2 + 0.1 * s)
            for s in range(6)]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    return [_write(tmp / "run-a.jsonl", _run_a()), _write(tmp / "run-b.jsonl", _run_b())]


@pytest.fixture(scope="module")
def rendered(two_runs, tmp_path_factory):
    """The comparison report of the two runs, rendered once through the CLI."""
    out = tmp_path_factory.mktemp("report")
    assert main([*two_runs, "--out-dir", str(out)]) == 0
    return out


def test_replayed_steps_count_once_last_wins_under_grouped_names(two_runs):
    run = load_jsonl(two_runs[0])
    assert [r["step"] for r in run.records] == [0, 1, 2, 3, 4, 5]
    assert run.records[3]["throughput/tokens_per_s"] == 300.0
    assert run.records[4]["moe/load_imbalance_layer_02"] == 3.0
    assert run.series("cluster/restarts")[1] == [0, 0, 0, 1, 1, 1]


def test_figures_by_hand(two_runs):
    header, rows = figures_table([load_jsonl(p) for p in two_runs])
    table = {row[0]: row[1:] for row in rows}
    assert header == ["figure", "run-a", "run-b"]
    # The first step of each worker group is warm-up (step 0, and step 3 of the restarted
    # group of run a, as the job summary counts): median(400, 600, 300, 350) = 375.
    assert table["tokens/s, median"] == ["375", "230"]
    # Load imbalance mean of run a: (1.5 * 5 + 2.5) / 6 = 1.667; run b: 1.2 + 0.1 * 2.5 = 1.45.
    assert table["load imbalance, mean"] == ["1.667", "1.45"]
    assert table["ep bytes per step, mean"] == ["2.00 KiB", "2.00 KiB"]
    assert table["loss, last"] == ["1.5", "2.5"]
    assert table["val loss, last"] == ["1.75", "2.75"]     # step 5 of each run


def test_loss_plot_draws_val_loss_when_present(two_runs):
    from dashboards.plots import loss_figure

    runs = [load_jsonl(p) for p in two_runs]
    lines = {line.get_label(): line for line in loss_figure(runs).axes[0].lines}
    assert set(lines) == {"run-a", "run-b", "run-a val loss", "run-b val loss"}
    val = lines["run-a val loss"]
    assert list(val.get_xdata()) == [1, 3, 5] and list(val.get_ydata()) == [5.25, 3.25, 1.75]
    assert val.get_linestyle() == "--" and val.get_color() == lines["run-a"].get_color()
    without = Run("c", "c", [{"step": 0, "train/loss": 1.0}])
    assert [line.get_label() for line in loss_figure([without]).axes[0].lines] == ["c"]


def test_config_diff_lists_only_the_keys_that_differ():
    runs = [Run("a", "a", [], params={"parallel.ep": "4", "train.lr": "0.003", "name": "x"}),
            Run("b", "b", [], params={"parallel.ep": "2", "train.lr": "0.003", "name": "x",
                                      "moe.capacity_factor": "1.0"})]
    assert config_diff(runs) == (["key", "a", "b"], [["moe.capacity_factor", "-", "1.0"],
                                                    ["parallel.ep", "4", "2"]])


def test_markdown_links_every_png(rendered):
    out = rendered
    md = (out / "report.md").read_text()
    for stem, title, _ in PLOTS:
        assert f"![{title}]({stem}.png)" in md
        assert (out / f"{stem}.png").stat().st_size > 5000
    assert "## Config differences" in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(PLOTS) and "src='" + "loss.png" not in html


def _figure_bands(shot: np.ndarray, x: int) -> list[tuple[int, int]]:
    """Row ranges where column x is white: the plots (white figures) on the grey page."""
    white = np.all(shot[:, x:x + 6, :3] > 0.99, axis=(1, 2))
    bands, start = [], None
    for y, is_white in enumerate([*white, False]):
        if is_white and start is None:
            start = y
        elif not is_white and start is not None:
            if y - start >= 100:
                bands.append((start, y))
            start = None
    return bands


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed "
                    "(apt-get install chromium; .ci/run installs it)")
def test_html_comparison_of_two_runs_shows_every_plot_in_chromium(rendered, tmp_path):
    import matplotlib.image

    out = rendered
    shot = tmp_path / "shot.png"
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
         f"--user-data-dir={tmp_path / 'chromium'}", "--force-device-scale-factor=1",
         "--window-size=1000,4600", f"--screenshot={shot}", (out / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120)
    assert shot.exists(), done.stderr[-2000:]
    pixels = matplotlib.image.imread(str(shot))
    width, height = int(WIDTH_IN * DPI), int(HEIGHT_IN * DPI)
    bands = _figure_bands(pixels, x=16 + 2)          # body margin 16 px, figures left-aligned
    assert [y1 - y0 for y0, y1 in bands] == [height] * len(PLOTS), bands
    for (y0, y1), (stem, _, _) in zip(bands, PLOTS):
        area = pixels[y0:y1, 16:16 + width, :3]
        # Axes and text are grey; only plotted data is in colour. Measured: a figure with no
        # data has 1.4-2.8% non-white pixels and 0 coloured ones; these have >= 1,800 coloured.
        drawn = np.any(area < 0.9, axis=2).mean()
        colour = (area.max(axis=2) - area.min(axis=2) > 0.25).sum()
        assert drawn > 0.01 and colour > 500, (stem, drawn, colour)


def test_report_from_two_mlflow_runs_with_their_config_diff(tmp_path):
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("report-test")
    run_ids = []
    for ep, losses in (("4", [5.0, 4.0, 3.0]), ("2", [5.5, 4.5, 4.0])):
        run = client.create_run(experiment, run_name=f"ep{ep}")
        client.log_batch(run.info.run_id, metrics=[
            Metric(key, value, 1000 + step, step)
            for step, loss in enumerate(losses)
            for key, value in (("train/loss", loss), ("throughput/tokens_per_s", 100.0 * (step + 1)),
                               ("comm/bytes_ep", 4096.0), ("system/cpu_utilization_percentage", 50.0))])
        client.log_param(run.info.run_id, "layout.ep", ep)
        run_ids.append(run.info.run_id)
    out = tmp_path / "out"
    assert main([*run_ids, "--tracking-uri", uri, "--out-dir", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert f"| ep4 ({run_ids[0][:8]}) | {run_ids[0]} | 0..2 |" in md and "ep=4" in md
    assert "| loss, last | 3 | 4 |" in md
    assert "| tokens/s, median | 250 | 250 |" in md      # median of 200 and 300 (step 0 = warm-up)
    assert "| layout.ep | 4 | 2 |" in md                 # the config-diff table


def test_bad_inputs_are_one_line_errors(tmp_path, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).create_experiment("e")
    port = free_port()                                   # nothing listens there
    capsys.readouterr()                                  # MLflow's own lines on creating the store
    cases = [([("0" * 32), "--tracking-uri", uri], f"report error: run {'0' * 32}: no such MLflow run at {uri}"),
             (["abc", "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}"],
              f"report error: tracking store sqlite:///{tmp_path / 'none.db'}: no such database file"),
             (["abc", "--tracking-uri", f"http://127.0.0.1:{port}"],
              f"report error: tracking store http://127.0.0.1:{port}: unreachable ("),
             ([str(tmp_path / "missing.jsonl")], f"report error: {tmp_path / 'missing.jsonl'}: cannot read")]
    for args, expected in cases:
        assert main([*args, "--out-dir", str(tmp_path / "out")]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(expected), line
    assert not os.path.exists(tmp_path / "none.db")     # the report never creates a store

"""Review report of one or more training runs: plots (PNG), a Markdown page linking them and
a self-contained HTML page (plots embedded), from MLflow runs or --metrics-jsonl files.

    python -m dashboards.report RUN_ID [RUN_ID ...] [--tracking-uri URI] [--out-dir DIR]
    python -m dashboards.report runs/m.jsonl [...]

Plots: loss and val loss; tokens/s and MFU; per-layer expert load as a heatmap over steps; dropped-token
fraction; bytes per step by mesh axis; step time and its breakdown; restarts and world size
over time. With two or more runs the curves are overlaid and a table lists the config keys
whose values differ. The driver logs this report as each run's `report/` artifacts.
A wrong run id, an unreachable store or an unreadable file is a one-line error (exit 2).
"""
from __future__ import annotations

import argparse
import base64
import html
import os
import statistics
import sys

from .runs import ReportError, Run, load_run

EXIT_INPUT = 2
LAYOUT_KEYS = ("world_size", "tp", "cp", "dp", "pp", "ep", "etp", "edp", "vpp")
STAT_ROWS = (  # (label, grouped metric, unit, skip the first step as warm-up)
    ("loss, last", "train/loss", "", False),
    ("val loss, last", "train/val_loss", "", False),
    ("tokens/s, median", "throughput/tokens_per_s", "", True),
    ("MFU, median", "throughput/mfu", "%", True),
    ("step time, median", "time/step_s", " s", True),
    ("load imbalance, mean", "moe/load_imbalance", "", False),
    ("dropped tokens, mean", "moe/dropped_token_fraction", "%", False),
)


# ------------------------------------------------------------------ figures in tables

def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if unit == "%":
        return f"{100 * value:.2f}%"
    if unit == "B":
        for scale, name in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
            if abs(value) >= scale:
                return f"{value / scale:.2f} {name}"
        return f"{value:.0f} B"
    return f"{value:,.4g}{unit}"


def run_figure(run: Run, key: str, how: str, warmup: bool) -> float | None:
    """warmup: leave out the first step of every worker group (the run's first, and each
    restarted group's, which carries cluster/recovery_s), as the job summary does."""
    steps, values = run.series(key)
    if warmup:
        starts = set(steps[:1]) | set(run.series("cluster/recovery_s")[0])
        values = [v for s, v in zip(steps, values) if s not in starts] or values
    if not values:
        return None
    return {"last": values[-1], "median": statistics.median(values), "mean": statistics.fmean(values),
            "max": max(values)}[how]


def runs_table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    header = ["run", "source", "steps", "restarts", "layout", "peak FLOP/s source"]
    rows = []
    for run in runs:
        steps = run.series("train/loss")[0]
        layout = ", ".join(f"{k}={run.params[f'layout.{k}']}" for k in LAYOUT_KEYS
                           if f"layout.{k}" in run.params)
        restarts = run_figure(run, "cluster/restarts", "max", False)
        rows.append([run.label, run.source, f"{steps[0]}..{steps[-1]}" if steps else "none",
                     _fmt(restarts), layout or "n/a",
                     run.params.get("peak_flops_source", "n/a").split(" (")[0]])
    return header, rows


def figures_table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    header = ["figure"] + [run.label for run in runs]
    rows = []
    for label, key, unit, warmup in STAT_ROWS:
        how = label.rsplit(", ", 1)[1]
        rows.append([label] + [_fmt(run_figure(run, key, how, warmup), unit) for run in runs])
    axes = sorted({k.split("_", 1)[1] for run in runs for k in run.keys() if k.startswith("comm/bytes_")})
    for axis in axes:
        rows.append([f"{axis} bytes per step, mean"]
                    + [_fmt(run_figure(run, f"comm/bytes_{axis}", "mean", False), "B") for run in runs])
    return header, rows


def config_diff(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """Config keys (MLflow params) whose values differ between the runs; '-' = absent."""
    keys = sorted({k for run in runs for k in run.params})
    rows = [[key] + [run.params.get(key, "-") for run in runs] for key in keys
            if len({run.params.get(key, "-") for run in runs}) > 1]
    return ["key"] + [run.label for run in runs], rows


# ------------------------------------------------------------------ pages

def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|")
    out = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(map(cell, row)) + " |" for row in rows] + [""]


def sections(runs: list[Run]) -> list[tuple[str, list]]:
    """[(heading, [("table", header, rows) | ("text", str) | ("plot", title, file)])]"""
    out = [("Runs", [("table", *runs_table(runs))]), ("Figures", [("table", *figures_table(runs))])]
    if len(runs) > 1:
        header, rows = config_diff(runs)
        body = [("table", header, rows)] if rows else [("text", "The runs' configs are identical.")]
        out.append(("Config differences", body))
    return out


def render_markdown(runs: list[Run], plots: list[tuple[str, str, str]]) -> str:
    lines = [f"# foldmoe run report: {', '.join(run.label for run in runs)}", ""]
    for heading, items in sections(runs):
        lines += [f"## {heading}", ""]
        for item in items:
            lines += _md_table(item[1], item[2]) if item[0] == "table" else [item[1], ""]
    lines += ["## Plots", ""]
    for _, title, name in plots:
        lines += [f"### {title}", "", f"![{title}]({name})", ""]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


# Plots sit at their natural size (900 x 360 px) on a grey page, left-aligned.
STYLE = ("body{font-family:sans-serif;background:#eceff3;color:#111;margin:16px}"
         "table{border-collapse:collapse;margin:8px 0}td,th{padding:2px 10px;text-align:left;"
         "border-bottom:1px solid #c8ccd2}img{display:block;margin:4px 0 18px 0}"
         "h3{margin:10px 0 2px 0}")


def render_html(runs: list[Run], plots: list[tuple[str, str, str]], out_dir: str) -> str:
    """One self-contained page: the tables, then every plot embedded as a PNG data URI."""
    body = [f"<h1>foldmoe run report: {html.escape(', '.join(run.label for run in runs))}</h1>"]
    for heading, items in sections(runs):
        body.append(f"<h2>{html.escape(heading)}</h2>")
        for item in items:
            body.append(_html_table(item[1], item[2]) if item[0] == "table"
                        else f"<p>{html.escape(item[1])}</p>")
    body.append("<h2>Plots</h2>")
    for stem, title, name in plots:
        with open(os.path.join(out_dir, name), "rb") as handle:
            data = base64.b64encode(handle.read()).decode()
        body.append(f"<section id='plot-{stem}'><h3>{html.escape(title)}</h3>"
                    f"<img alt='{html.escape(title)}' src='data:image/png;base64,{data}'></section>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>foldmoe run report</title>"
            f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n")


def write_report(runs: list[Run], out_dir: str) -> dict[str, str]:
    from .plots import render_plots

    os.makedirs(out_dir, exist_ok=True)
    plots = render_plots(runs, out_dir)
    paths = {"markdown": os.path.join(out_dir, "report.md"), "html": os.path.join(out_dir, "report.html")}
    with open(paths["markdown"], "w", encoding="utf-8") as handle:
        handle.write(render_markdown(runs, plots))
    with open(paths["html"], "w", encoding="utf-8") as handle:
        handle.write(render_html(runs, plots, out_dir))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dashboards.report",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("sources", nargs="+", metavar="RUN_ID_OR_JSONL",
                        help="MLflow run ids and/or --metrics-jsonl files")
    parser.add_argument("--tracking-uri", help="MLflow URI (default: as foldmoe train)")
    parser.add_argument("--out-dir", default="report",
                        help="where report.md, report.html and the PNGs go (default: ./report)")
    args = parser.parse_args(argv)
    try:
        runs = [load_run(source, args.tracking_uri) for source in args.sources]
    except ReportError as err:
        print(f"report error: {err}", file=sys.stderr)
        return EXIT_INPUT
    labels = [run.label for run in runs]
    for i, run in enumerate(runs):      # legends and columns need distinct names
        if labels.count(run.label) > 1:
            run.label = f"{run.label} #{i + 1}"
    paths = write_report(runs, args.out_dir)
    print(f"report: {paths['markdown']} and {paths['html']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

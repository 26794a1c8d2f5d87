"""Review report of a training run, from its metrics JSONL or its MLflow run.

    python -m dashboards.report runs/metrics.jsonl [--out report.md] [--html report.html]
    python -m dashboards.report <mlflow-run-id> [--tracking-uri URI] [--out ...]

Sections: loss curve summary, throughput (tokens/s, TFLOP/s/device, MFU), MoE health
(expert-load imbalance = max/mean tokens per expert, dropped-token fraction) and bytes
communicated per step by mesh axis. Steps replayed after a restart count once (last wins).
"""
from __future__ import annotations

import argparse
import html
import json
import os
import statistics
import sys

SPARK = "▁▂▃▄▅▆▇█"
COMM_PREFIX = "comm_bytes_"


# ------------------------------------------------------------------ loading

def load_jsonl(path: str) -> list[dict]:
    by_step: dict[int, dict] = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                record = json.loads(line)
                by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]


def load_mlflow(run_id: str, tracking_uri: str | None) -> tuple[list[dict], dict]:
    """Per-step records rebuilt from the run's metric histories, and the run's params."""
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking import resolve_tracking_uri

    client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))
    run = client.get_run(run_id)
    by_step: dict[int, dict] = {}
    for key in run.data.metrics:
        for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp):
            by_step.setdefault(m.step, {"step": m.step})[key] = m.value
    records = [by_step[s] for s in sorted(by_step) if "loss" in by_step[s]]
    return records, dict(run.data.params)


# ------------------------------------------------------------------ statistics

def series(records: list[dict], key: str) -> list[float]:
    return [float(r[key]) for r in records if isinstance(r.get(key), (int, float))]


def sparkline(values: list[float], width: int = 60) -> str:
    if not values:
        return ""
    stride = max(1, -(-len(values) // width))
    points = [statistics.fmean(values[i:i + stride]) for i in range(0, len(values), stride)]
    lo, hi = min(points), max(points)
    span = (hi - lo) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((v - lo) / span * len(SPARK)))] for v in points)


def steady(values: list[float]) -> list[float]:
    """Drops the first step (warm-up: allocation, kernel selection) when there are others."""
    return values[1:] if len(values) > 1 else values


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


def summarize(records: list[dict]) -> dict:
    loss = series(records, "loss")
    tenth = max(1, len(loss) // 10)
    comm = sorted({k[len(COMM_PREFIX):] for r in records for k in r if k.startswith(COMM_PREFIX)})
    return {
        "steps": len(records),
        "first_step": records[0]["step"] if records else None,
        "last_step": records[-1]["step"] if records else None,
        "restarts": int(max(series(records, "restarts"), default=0)),
        "loss": {"first": loss[0], "last": loss[-1], "min": min(loss),
                 "mean_first_10pct": statistics.fmean(loss[:tenth]),
                 "mean_last_10pct": statistics.fmean(loss[-tenth:])} if loss else {},
        "throughput": {key: _stats(steady(series(records, key)))
                       for key in ("tokens_per_s", "tflops_per_device", "mfu", "step_time_s")},
        "moe": {key: _stats(series(records, key))
                for key in ("load_imbalance", "dropped_token_fraction", "aux_loss")},
        "comm_bytes_per_step": {axis: _stats(series(records, COMM_PREFIX + axis)) for axis in comm},
    }


def _stats(values: list[float]) -> dict:
    if not values:
        return {}
    return {"mean": statistics.fmean(values), "p50": percentile(values, 0.5),
            "p90": percentile(values, 0.9), "max": max(values), "last": values[-1]}


# ------------------------------------------------------------------ rendering

def _num(value: float | None, unit: str = "") -> str:
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


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out


def _stat_rows(block: dict, units: dict[str, str]) -> list[list[str]]:
    rows = []
    for key, st in block.items():
        if st:
            unit = units.get(key, "")
            rows.append([key] + [_num(st[c], unit) for c in ("mean", "p50", "p90", "max", "last")])
    return rows


def render_markdown(records: list[dict], title: str, params: dict | None = None) -> str:
    s = summarize(records)
    lines = [f"# foldmoe run report: {title}", ""]
    if not records:
        return "\n".join(lines + ["No step records found.", ""])
    lines += [f"Steps {s['first_step']}..{s['last_step']} ({s['steps']} records), "
              f"restarts: {s['restarts']}.", ""]
    if params:
        layout = ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in sorted(params.items())
                           if k.startswith("layout."))
        lines += [f"Layout: {layout or 'n/a'}; parameters total {params.get('params.total', 'n/a')}, "
                  f"active {params.get('params.active', 'n/a')}.", ""]
    loss = s["loss"]
    lines += ["## Loss", "", f"`{sparkline(series(records, 'loss'))}`", ""]
    lines += _table(["first", "last", "min", "mean first 10%", "mean last 10%"],
                    [[_num(loss[k]) for k in ("first", "last", "min", "mean_first_10pct",
                                               "mean_last_10pct")]])
    cols = ["metric", "mean", "p50", "p90", "max", "last"]
    lines += ["", "## Throughput (first step excluded as warm-up)", ""]
    lines += _table(cols, _stat_rows(s["throughput"], {"mfu": "%", "step_time_s": " s"}))
    lines += ["", "## MoE", "", "Load imbalance is max/mean tokens per expert (1.0 = perfect).", ""]
    lines += _table(cols, _stat_rows(s["moe"], {"dropped_token_fraction": "%"}))
    lines += ["", "## Communication per step by axis", ""]
    comm = {f"{axis}": st for axis, st in s["comm_bytes_per_step"].items()}
    lines += _table(["axis", "mean", "p50", "p90", "max", "last"],
                    _stat_rows(comm, {axis: "B" for axis in comm})) if comm else ["n/a"]
    return "\n".join(lines) + "\n"


def _loss_svg(loss: list[float], width: int = 640, height: int = 200) -> str:
    if len(loss) < 2:
        return ""
    lo, hi = min(loss), max(loss)
    span = (hi - lo) or 1.0
    points = " ".join(f"{i / (len(loss) - 1) * width:.1f},{height - (v - lo) / span * height:.1f}"
                      for i, v in enumerate(loss))
    return (f'<svg width="{width}" height="{height}" style="border:1px solid #ccc">'
            f'<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{points}"/></svg>'
            f"<p>loss {hi:.4g} (top) to {lo:.4g} (bottom)</p>")


def render_html(markdown: str, records: list[dict]) -> str:
    """A self-contained page: headings, tables and paragraphs of the Markdown, plus an SVG
    loss curve under the Loss heading."""
    body, table = [], []

    def flush_table() -> None:
        if table:
            rows = [r for r in table if not set(r.replace("|", "").strip()) <= {"-"}]
            cells = [[html.escape(c.strip()) for c in r.strip().strip("|").split("|")] for r in rows]
            head = "".join(f"<th>{c}</th>" for c in cells[0])
            rest = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in cells[1:])
            body.append(f"<table><tr>{head}</tr>{rest}</table>")
            table.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush_table()
        if line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
            if line[3:] == "Loss":
                body.append(_loss_svg(series(records, "loss")))
        elif line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.strip():
            body.append(f"<p>{html.escape(line.strip('`'))}</p>")
    flush_table()
    style = "body{font-family:sans-serif;max-width:900px}td,th{padding:2px 8px;text-align:right}"
    return f"<!doctype html><html><head><meta charset='utf-8'><style>{style}</style></head>" \
           f"<body>{''.join(body)}</body></html>\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dashboards.report", description=__doc__.split("\n")[0])
    parser.add_argument("source", help="metrics JSONL path, or an MLflow run id")
    parser.add_argument("--tracking-uri", help="MLflow URI (default: as foldmoe train)")
    parser.add_argument("--out", help="write the Markdown here (default: stdout)")
    parser.add_argument("--html", help="also write an HTML page here")
    args = parser.parse_args(argv)
    if os.path.isfile(args.source):
        records, params, title = load_jsonl(args.source), None, os.path.basename(args.source)
    else:
        records, params = load_mlflow(args.source, args.tracking_uri)
        title = f"MLflow run {args.source}"
    markdown = render_markdown(records, title, params)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(markdown)
    else:
        sys.stdout.write(markdown)
    if args.html:
        with open(args.html, "w", encoding="utf-8") as handle:
            handle.write(render_html(markdown, records))
    return 0


if __name__ == "__main__":
    sys.exit(main())

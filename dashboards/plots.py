"""The report's figures (matplotlib, Agg, one PNG each), for one run or overlaid for several.

Every figure has titled, labelled axes; a run without the figure's metrics gets a figure
that says so instead of empty axes. PLOTS lists them in report order: (file stem, title,
function(runs) -> Figure).
"""
from __future__ import annotations

import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from orchestrator.metric_names import STEP_PHASES, layer_of  # noqa: E402

from .runs import Run  # noqa: E402

WIDTH_IN, HEIGHT_IN, DPI = 9.0, 3.6, 100      # 900 x 360 px per figure
COMM_AXES = ("dp", "ep", "tp", "cp", "pp")


def _figure(ncols: int = 1, height: float = HEIGHT_IN) -> tuple[Figure, list]:
    fig, axes = plt.subplots(1, ncols, figsize=(WIDTH_IN, height), dpi=DPI, squeeze=False)
    fig.patch.set_facecolor("white")
    return fig, list(axes[0])


def _style(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if xlabel == "step":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} recorded", ha="center", va="center", transform=ax.transAxes,
            color="0.4")


def _lines(ax, runs: list[Run], key: str, scale: float = 1.0, style: str = "-",
           suffix: str = "") -> bool:
    drawn = False
    for i, run in enumerate(runs):
        steps, values = run.series(key)
        if steps:
            ax.plot(steps, [v * scale for v in values], style, color=f"C{i}", lw=1.4,
                    label=f"{run.label}{suffix}")
            drawn = True
    return drawn


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")


def loss_figure(runs: list[Run]) -> Figure:
    """Training loss as lines; the held-out LM loss (`train/val_loss`, when the run has
    train.eval_every) dashed with markers in the same run colour."""
    fig, (ax,) = _figure()
    drawn = _lines(ax, runs, "train/loss")
    has_val = _lines(ax, runs, "train/val_loss", style="o--", suffix=" val loss")
    title = "Training loss (total: LM + aux + z)" + ("; validation: held-out LM loss" if has_val else "")
    _style(ax, title, "step", "loss")
    _legend(ax) if drawn else _no_data(ax, "loss")
    fig.tight_layout()
    return fig


def throughput_figure(runs: list[Run]) -> Figure:
    fig, (left, right) = _figure(2)
    _lines(left, runs, "throughput/tokens_per_s")
    _style(left, "Tokens per second (all workers)", "step", "tokens/s")
    drawn = _lines(right, runs, "throughput/mfu", scale=100.0)
    peak = next((r.params.get("peak_flops_source", "") for r in runs if r.params), "")
    _style(right, "MFU" + (" (calibrated CPU peak)" if peak.startswith("calibrated") else ""),
           "step", "MFU (%)")
    for ax in (left, right):
        _legend(ax)
    if not drawn:
        _no_data(right, "MFU")
    fig.tight_layout()
    return fig


def expert_load_figure(runs: list[Run]) -> Figure:
    """Per MoE layer, max/mean tokens per expert at every step (1 = perfectly balanced)."""
    fig, axes = _figure(len(runs), height=HEIGHT_IN)
    for ax, run in zip(axes, runs):
        layers = sorted({layer_of(k) for k in run.keys() if layer_of(k) is not None})
        steps = [r["step"] for r in run.records]
        if not layers or not steps:
            _style(ax, f"Expert load: {run.label}", "step", "MoE layer")
            _no_data(ax, "per-layer expert load")
            continue
        grid = [[r.get(f"moe/load_imbalance_layer_{layer:02d}", float("nan")) for r in run.records]
                for layer in layers]
        image = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest",
                          extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, len(layers) - 0.5))
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        _style(ax, f"Expert load (max/mean tokens per expert): {run.label}", "step", "MoE layer")
        ax.grid(False)
        fig.colorbar(image, ax=ax, label="max / mean")
    fig.tight_layout()
    return fig


def dropped_figure(runs: list[Run]) -> Figure:
    fig, (ax,) = _figure()
    drawn = _lines(ax, runs, "moe/dropped_token_fraction", scale=100.0)
    _style(ax, "Dropped tokens (routed top-k assignments over capacity; 0 = dropless)", "step",
           "dropped (%)")
    _legend(ax) if drawn else _no_data(ax, "dropped-token fraction")
    fig.tight_layout()
    return fig


def comm_figure(runs: list[Run]) -> Figure:
    fig, (ax,) = _figure()
    styles = ("-", "--", ":", "-.")
    drawn = False
    for r, run in enumerate(runs):
        for a, axis in enumerate(COMM_AXES):
            steps, values = run.series(f"comm/bytes_{axis}")
            if steps and any(values):
                ax.plot(steps, [v / 2 ** 20 for v in values], styles[r % len(styles)], color=f"C{a}",
                        lw=1.4, label=f"{axis}" + (f" ({run.label})" if len(runs) > 1 else ""))
                drawn = True
    _style(ax, "Bytes sent per step by mesh axis (this rank's collectives)", "step", "MiB per step")
    _legend(ax) if drawn else _no_data(ax, "communication counters")
    fig.tight_layout()
    return fig


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def step_time_figure(runs: list[Run]) -> Figure:
    """Left: step time over steps; right: median time per phase, stacked, one bar per run."""
    fig, (left, right) = _figure(2)
    drawn = _lines(left, runs, "time/step_s")
    _style(left, "Step time", "step", "seconds")
    _legend(left)
    if not drawn:
        _no_data(left, "step times")
    bottoms = [0.0] * len(runs)
    for p, phase in enumerate(STEP_PHASES):
        heights = [_median(run.series(f"time/{phase}_s")[1][1:] or run.series(f"time/{phase}_s")[1])
                   for run in runs]
        right.bar(range(len(runs)), heights, bottom=bottoms, color=f"C{p}", label=phase)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    right.set_xticks(range(len(runs)), [run.label for run in runs], fontsize=8)
    _style(right, "Median step-time breakdown (first step excluded)", "run", "seconds")
    if any(bottoms):
        right.legend(fontsize=8, loc="best")
    else:
        _no_data(right, "step-time breakdown")
    fig.tight_layout()
    return fig


def restarts_figure(runs: list[Run]) -> Figure:
    fig, (left, right) = _figure(2)
    timed = [[r for r in run.records if r.get("time") is not None] for run in runs]
    span = max((t[-1]["time"] - t[0]["time"] for t in timed if t), default=0.0)
    unit, scale = ("minutes", 60.0) if span > 120 else ("seconds", 1.0)
    highest = {"cluster/restarts": 0.0, "cluster/world_size": 0.0}
    for i, (run, records) in enumerate(zip(runs, timed)):
        if not records:
            continue
        t0 = records[0]["time"]
        elapsed = [(r["time"] - t0) / scale for r in records]
        for ax, key in ((left, "cluster/restarts"), (right, "cluster/world_size")):
            points = [(t, r[key]) for t, r in zip(elapsed, records) if r.get(key) is not None]
            if points:
                ax.step([t for t, _ in points], [v for _, v in points], where="post",
                        color=f"C{i}", lw=1.4, label=run.label)
                highest[key] = max(highest[key], max(v for _, v in points))
    _style(left, "Worker-group restarts", f"{unit} since the first step", "restarts")
    _style(right, "World size (workers)", f"{unit} since the first step", "workers")
    left.set_ylim(-0.2, highest["cluster/restarts"] + 1)
    right.set_ylim(0, highest["cluster/world_size"] * 1.25 + 1)
    for ax, key in ((left, "cluster/restarts"), (right, "cluster/world_size")):
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        _legend(ax) if ax.lines else _no_data(ax, key.split("/")[1].replace("_", " "))
    fig.tight_layout()
    return fig


PLOTS = (
    ("loss", "Loss", loss_figure),
    ("throughput", "Throughput and MFU", throughput_figure),
    ("expert_load", "Expert load per layer", expert_load_figure),
    ("dropped_tokens", "Dropped tokens", dropped_figure),
    ("comm_bytes", "Communication by mesh axis", comm_figure),
    ("step_time", "Step time", step_time_figure),
    ("restarts", "Restarts and world size", restarts_figure),
)


def render_plots(runs: list[Run], out_dir: str) -> list[tuple[str, str, str]]:
    """Writes one PNG per figure; returns [(stem, title, file name)]."""
    import os

    written = []
    for stem, title, make in PLOTS:
        fig = make(runs)
        name = f"{stem}.png"
        fig.savefig(os.path.join(out_dir, name), dpi=DPI, facecolor="white")
        plt.close(fig)
        written.append((stem, title, name))
    return written

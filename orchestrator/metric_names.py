"""The one mapping from a worker's flat step record (`loss`, `comm_bytes_ep`, ... as in
--metrics-jsonl) to the grouped metric names of MLflow and the reports.

A `/` in an MLflow metric name groups the charts in the MLflow UI, so the names say what a
figure is about: `train/loss` sits with the other objective terms, not between
`comm_bytes_*` and `mfu` in one alphabetical list. Plain module, no imports, so the
dashboards read records through the same names without loading the driver.
"""
from __future__ import annotations

# flat record key -> grouped name
GROUPED: dict[str, str] = {
    "loss": "train/loss", "lm_loss": "train/lm_loss", "val_loss": "train/val_loss", "aux_loss": "train/aux_loss",
    "z_loss": "train/z_loss", "grad_norm": "train/grad_norm", "lr": "train/lr",
    "tokens_per_s": "throughput/tokens_per_s", "tflops_per_device": "throughput/tflops_per_device",
    "mfu": "throughput/mfu",
    "step_time_s": "time/step_s",
    "dropped_token_fraction": "moe/dropped_token_fraction", "load_imbalance": "moe/load_imbalance",
    "restarts": "cluster/restarts", "world_size": "cluster/world_size",
    "recovery_s": "cluster/recovery_s",   # on the first step of a restarted worker group
    "memory_peak_bytes": "memory/peak_bytes", "build_peak_bytes": "memory/build_peak_bytes",
    "param_bytes": "memory/param_bytes",
    # time a save held training up, and the (background) write's own time (workers/loop.py)
    "checkpoint_stall_s": "checkpoint/stall_s", "checkpoint_write_s": "checkpoint/write_s",
}
# Faults seen by the driver's watchdog (orchestrator/watchdog.py), logged when they happen.
FAULT_HANGS = "faults/hangs"              # hung ranks stopped so far
FAULT_STRAGGLERS = "faults/stragglers"    # ranks straggling at the step of a new straggler
COMM_PREFIX = "comm_bytes_"          # comm_bytes_<axis> -> comm/bytes_<axis>
TIME_PREFIX = "time_"                # time_<phase>_s (step-time breakdown) -> time/<phase>_s
LAYER_LOAD_KEY = "load_imbalance_by_layer"   # {layer id: max/mean} -> moe/load_imbalance_layer_<id>
LAYER_LOAD_PREFIX = "moe/load_imbalance_layer_"
# The order of the step-time breakdown (engine/train/trainer.py marks these phases).
STEP_PHASES = ("data", "forward_backward", "grad_sync", "optimizer", "metrics")


def grouped_metrics(record: dict) -> dict[str, float]:
    """The numeric figures of one step record under their grouped names."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key == LAYER_LOAD_KEY and isinstance(value, dict):
            for layer_id, load in value.items():
                out[f"{LAYER_LOAD_PREFIX}{int(layer_id):02d}"] = float(load)
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        name = grouped_name(key)
        if name is not None:
            out[name] = float(value)
    return out


def grouped_name(key: str) -> str | None:
    if key in GROUPED:
        return GROUPED[key]
    if key.startswith(COMM_PREFIX):
        return "comm/bytes_" + key[len(COMM_PREFIX):]
    if key.startswith(TIME_PREFIX) and key.endswith("_s"):
        return "time/" + key[len(TIME_PREFIX):]
    return None


def layer_of(name: str) -> int | None:
    """The layer id of a `moe/load_imbalance_layer_<id>` name, else None."""
    if name.startswith(LAYER_LOAD_PREFIX):
        return int(name[len(LAYER_LOAD_PREFIX):])
    return None

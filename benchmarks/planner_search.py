"""Time of a `foldmoe plan` search: Mixtral-8x22B on 1,024 H100s (GBS 256, seq 4096, bf16).

    PYTHONPATH=. python benchmarks/planner_search.py [--rounds 5] [--gpus 1024]

Each round is a fresh interpreter (cold: the pipeline splits and other per-process caches
are built anew), timed inside it; wall clock and CPU time (one core; on a shared machine
the CPU time is what the search costs, the wall clock includes waiting for a core).
Figures are recorded in docs/planner.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = """
import json, sys, time
from engine.config.model import get_preset
from engine.planner.cost import Machine
from engine.planner.devices import DEVICES
from engine.planner.search import search_layouts
from engine.config.train import TrainConfig
cfg = get_preset("mixtral-8x22b", moe_capacity_factor=1.0)
train = TrainConfig(global_batch_size=256, seq_len=4096, precision="bf16", zero1=True, overlap_grad_reduce=True)
r = search_layouts(cfg, train, int(sys.argv[1]), Machine(DEVICES["h100"], 8), memory_limit=80e9)
print(json.dumps({"wall": r.seconds, "cpu": r.cpu_seconds, "searched": r.searched, "feasible": len(r.rows)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--gpus", type=int, default=1024)
    args = parser.parse_args()
    runs = [json.loads(subprocess.run([sys.executable, "-c", CHILD, str(args.gpus)], check=True,
                                      capture_output=True, text=True).stdout)
            for _ in range(args.rounds)]
    print(f"{args.gpus} GPUs: searched {runs[0]['searched']}, feasible {runs[0]['feasible']}; "
          f"median wall {statistics.median(r['wall'] for r in runs):.3f} s, "
          f"median CPU {statistics.median(r['cpu'] for r in runs):.3f} s "
          f"(min CPU {min(r['cpu'] for r in runs):.3f} s, {args.rounds} cold runs)")


if __name__ == "__main__":
    main()

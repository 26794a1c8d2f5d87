"""Runs several `foldmoe eval` command lines in one torchrun world (`--launcher inline`: each
one is the CLI's own main on every rank); rank 0 writes each command's stdout to a JSON file.

    python -m torch.distributed.run --nproc-per-node N tests/orchestrator/eval_cases.py CASES.json OUT.json
CASES.json: {"label": [argv of foldmoe, ...], ...}. One launch amortises the start of N
Python processes over all the commands; every command still builds its own mesh and model.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys

from orchestrator.cli import main


def run_cases(cases: dict[str, list[str]]) -> dict[str, dict]:
    out = {}
    for label, argv in cases.items():
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            rc = main(argv)
        out[label] = {"rc": rc, "stdout": stdout.getvalue()}
    return out


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as handle:
        results = run_cases(json.load(handle))
    if os.environ.get("RANK", "0") == "0":
        with open(sys.argv[2], "w", encoding="utf-8") as handle:
            json.dump(results, handle)

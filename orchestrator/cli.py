"""`foldmoe` command line.

    foldmoe train CONFIG.yaml [--set key=value ...] [--metrics-jsonl PATH] [--launcher ray|torchrun]
    foldmoe validate CONFIG.yaml [--set key=value ...] [--json]

Exit codes: 0 success, 1 training failure, 2 config error (one line on stderr, nothing
started or written), 128+N when stopped by signal N.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import yaml

from .config import ConfigError, RunConfig, load_config

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="foldmoe", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("config", help="run config YAML")
    common.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, value parsed as YAML (repeatable)")
    train = sub.add_parser("train", parents=[common], help="run a training job")
    train.add_argument("--metrics-jsonl", help="append one JSON object per step to this file")
    train.add_argument("--launcher", choices=("ray", "torchrun"), default="ray")
    validate = sub.add_parser("validate", parents=[common],
                              help="check a config and print it with the folded layout")
    validate.add_argument("--json", action="store_true",
                          help="one JSON object: config, groups, memory")
    return parser


def _layout_world(run: RunConfig) -> int:
    return run.world_sizes[-1]


def validate_command(run: RunConfig, as_json: bool) -> int:
    """Layout table, memory table per rank role, resolved YAML; refuses (ConfigError)
    after printing them when the predicted memory does not fit the device."""
    from .memory_report import check_fits, memory_json, memory_text
    from .observer import layout_text

    world = _layout_world(run)
    groups = run.layout_table(world)
    if as_json:
        print(json.dumps({"config": run.resolved(), "world_size": world, "groups": groups,
                          "memory": memory_json(run, world)}))
        check_fits(run)
        return 0
    p = run.parallel(world)
    layout = {"tp": p.tp, "cp": p.cp, "pp": p.pp, "ep": p.ep, "etp": p.etp}
    print("folded layout, " + layout_text(world, layout, groups), end="")
    if run.elastic:
        print(f"(elastic: layout and memory also checked for world size {run.world_sizes[0]})")
    print("\n" + memory_text(run, world), end="")
    print("\nresolved config:\n" + yaml.safe_dump(run.resolved(), sort_keys=False), end="", flush=True)
    check_fits(run)
    return 0


def train_command(run: RunConfig, args: argparse.Namespace, driver_start: float) -> int:
    from .driver import run_training
    from .memory_report import check_fits

    check_fits(run)   # before any data, tracking or worker starts

    result = run_training(run, launcher=args.launcher, metrics_jsonl=args.metrics_jsonl,
                          driver_start=driver_start)
    if result.signaled is not None:
        # Stop within seconds: skip interpreter/Ray teardown; tracking is already flushed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(result.rc)
    return result.rc


def main(argv: list[str] | None = None) -> int:
    driver_start = time.time()
    args = _parser().parse_args(argv)
    try:
        run = load_config(args.config, args.overrides)
        if args.command == "validate":
            return validate_command(run, args.json)
        return train_command(run, args, driver_start)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())

"""`foldmoe` command line.

    foldmoe train CONFIG.yaml [--set key=value ...] [--metrics-jsonl PATH] [--launcher ray|torchrun]
                              [--resume | --no-resume]
    foldmoe validate CONFIG.yaml [--set key=value ...] [--json]

Exit codes: 0 success (also: already complete, nothing to train), 1 training failure,
2 config error or preflight refusal (one line on stderr, no worker started), 128+N when
stopped by signal N.
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
    train.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                       help="resume from the newest complete checkpoint in checkpoint.dir "
                            "(default: checkpoint.resume, true); --no-resume starts at step 0")
    validate = sub.add_parser("validate", parents=[common],
                              help="check a config and print it with the folded layout")
    validate.add_argument("--json", action="store_true", help="one JSON object: config, groups")
    return parser


def _layout_world(run: RunConfig) -> int:
    return run.world_sizes[-1]


def validate_command(run: RunConfig, as_json: bool) -> int:
    from .observer import layout_text

    world = _layout_world(run)
    groups = run.layout_table(world)
    if as_json:
        print(json.dumps({"config": run.resolved(), "world_size": world, "groups": groups}))
        return 0
    print(yaml.safe_dump(run.resolved(), sort_keys=False), end="")
    p = run.parallel(world)
    layout = {"tp": p.tp, "cp": p.cp, "pp": p.pp, "ep": p.ep, "etp": p.etp}
    print("\nfolded layout, " + layout_text(world, layout, groups), end="")
    if run.elastic:
        print(f"(elastic: layout also checked for world size {run.world_sizes[0]})")
    return 0


def train_command(run: RunConfig, args: argparse.Namespace, driver_start: float) -> int:
    from .driver import run_training

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
        overrides = list(args.overrides)
        if getattr(args, "resume", None) is not None:
            overrides.append(f"checkpoint.resume={'true' if args.resume else 'false'}")
        run = load_config(args.config, overrides)
        if args.command == "validate":
            return validate_command(run, args.json)
        return train_command(run, args, driver_start)
    except ConfigError as err:
        print(f"{err.kind}: {err}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())

"""`foldmoe` command line.

    foldmoe train CONFIG.yaml [--set key=value ...] [--metrics-jsonl PATH] [--launcher ray|torchrun]
    foldmoe validate CONFIG.yaml [--set key=value ...] [--json]
    foldmoe export CHECKPOINT_STEP_DIR OUT_DIR [--model-type T] [--max-shard-size 5GB]

Exit codes: 0 success, 1 training failure, 2 config error (one line on stderr, nothing
started or written), 128+N when stopped by signal N.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import yaml

from .config import EXIT_CONFIG, ConfigError, RunConfig, add_config_arguments, load_config
from .driver import add_train_arguments, train_command
from .export_command import add_export_parser, export_command

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="foldmoe", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    add_config_arguments(common)
    train = sub.add_parser("train", parents=[common], help="run a training job")
    add_train_arguments(train)
    validate = sub.add_parser("validate", parents=[common],
                              help="check a config and print it with the folded layout")
    validate.add_argument("--json", action="store_true", help="one JSON object: config, groups")
    add_export_parser(sub)
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


def main(argv: list[str] | None = None) -> int:
    driver_start = time.time()
    args = _parser().parse_args(argv)
    if args.command == "export":
        return export_command(args)
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

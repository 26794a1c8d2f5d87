"""`foldmoe` command line.

    foldmoe train CONFIG.yaml [--set key=value ...] [--metrics-jsonl PATH] [--launcher ray|torchrun]
                              [--resume | --no-resume]
    foldmoe validate CONFIG.yaml [--set key=value ...] [--json]
    foldmoe export CHECKPOINT_STEP_DIR OUT_DIR [--model-type T] [--max-shard-size 5GB]

Exit codes: 0 success (also: already complete, nothing to train), 1 training failure,
2 config error or preflight refusal (one line on stderr, no worker started), 128+N when
stopped by signal N.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import yaml

from .config import EXIT_CONFIG, ConfigError, RunConfig, add_config_arguments, load_config
from .driver import add_train_arguments, run_train_args
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
    from engine.parallel.replan import describe

    from .observer import layout_text

    world = _layout_world(run)
    groups = run.layout_table(world)
    elastic = {w: describe(run.parallel(w)) for w in run.world_sizes} if run.elastic else {}
    if as_json:
        print(json.dumps({"config": run.resolved(), "world_size": world, "groups": groups,
                          **({"elastic_layouts": elastic} if run.elastic else {})}))
        return 0
    print(yaml.safe_dump(run.resolved(), sort_keys=False), end="")
    p = run.parallel(world)
    layout = {"tp": p.tp, "cp": p.cp, "pp": p.pp, "ep": p.ep, "etp": p.etp}
    print("\nfolded layout, " + layout_text(world, layout, groups), end="")
    if run.elastic:
        print("elastic: the layout at every world size (re-planned where the configured "
              "degrees do not divide it):")
        for w, text in elastic.items():
            print(f"  {w:>4} workers: {text}")
    return 0


def main(argv: list[str] | None = None) -> int:
    driver_start = time.time()
    args = _parser().parse_args(argv)
    if args.command == "train":
        return run_train_args(args, driver_start)
    if args.command == "export":
        return export_command(args)
    try:
        return validate_command(load_config(args.config, args.overrides), args.json)
    except ConfigError as err:
        print(f"{err.kind}: {err}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())

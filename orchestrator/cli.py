"""`foldmoe` command line.

    foldmoe train CONFIG.yaml [--set key=value ...] [--metrics-jsonl PATH] [--launcher ray|torchrun]
                              [--resume | --no-resume]
    foldmoe validate CONFIG.yaml [--set key=value ...] [--json]
    foldmoe eval CONFIG.yaml [--set key=value ...] [--tokens FILE.jsonl] [--json] [--launcher inline|torchrun|ray]
    foldmoe export CHECKPOINT_STEP_DIR OUT_DIR [--model-type T] [--max-shard-size 5GB]
    foldmoe plan CONFIG.yaml --gpus N [--gpu h100|h200|a100|b200|cpu] [--gpus-per-node 8]
                 [--top K] [--only tp=2,ep=8,...] [--calibrate] [--set ...] [--json]

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

from .config import ConfigError, RunConfig, add_config_arguments, load_config
from .errors import EXIT_CONFIG
from .driver import add_train_arguments, run_train_args
from .eval_command import add_eval_parser, eval_command
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
    validate.add_argument("--json", action="store_true",
                          help="one JSON object: config, groups, memory")
    add_eval_parser(sub)
    add_export_parser(sub)
    plan = sub.add_parser("plan", parents=[common],
                          help="rank every folded layout of N GPUs by predicted step time")
    plan.add_argument("--gpus", type=int, required=True, help="world size to plan for")
    plan.add_argument("--gpu", choices=("h100", "h200", "a100", "b200", "cpu"), default=None,
                      help="device row of the cost and memory model (default: cluster.gpu, "
                           "or cpu when cluster.use_gpu is false)")
    plan.add_argument("--gpus-per-node", type=int, default=None,
                      help="GPUs per node (default 8; all of them for cpu)")
    plan.add_argument("--top", type=int, default=10, help="rows to print; 0 = every feasible layout")
    plan.add_argument("--only", default=None, metavar="KEY=V,...",
                      help="keep layouts with these values (tp cp pp vpp ep etp dp edp "
                           "micro_batch_size recompute)")
    plan.add_argument("--calibrate", action="store_true",
                      help="measure this machine's GEMM rate and collective bandwidth first "
                           "(gloo on CPU, NCCL on GPU) and use them instead of the table")
    plan.add_argument("--json", action="store_true", help="one JSON object: searched, seconds, layouts")
    return parser


def _layout_world(run: RunConfig) -> int:
    return run.world_sizes[-1]


def validate_command(run: RunConfig, as_json: bool) -> int:
    """Layout table, memory table per rank role, resolved YAML; refuses (ConfigError)
    after printing them when the predicted memory does not fit the device."""
    from engine.parallel.replan import describe

    from .memory_report import check_fits, memory_json, memory_text
    from .observer import layout_text

    world = _layout_world(run)
    groups = run.layout_table(world)
    elastic = {w: describe(run.parallel(w)) for w in run.world_sizes} if run.elastic else {}
    if as_json:
        print(json.dumps({"config": run.resolved(), "world_size": world, "groups": groups,
                          **({"elastic_layouts": elastic} if run.elastic else {}),
                          "memory": memory_json(run, world)}))
        check_fits(run)
        return 0
    p = run.parallel(world)
    layout = {"tp": p.tp, "cp": p.cp, "pp": p.pp, "ep": p.ep, "etp": p.etp}
    if run.schema.parallel.auto:
        from .planning import auto_layout
        row = auto_layout(run, world)[1]
        print(f"parallel.auto: the planner's first row for {world} workers (vpp={p.vpp}): predicted "
              f"{row.step_time_s:.4g} s/step, MFU {row.mfu:.1%} (foldmoe plan --gpus {world})")
    print("folded layout, " + layout_text(world, layout, groups), end="")
    if run.elastic:
        print("elastic: the layout at every world size (re-planned where the configured "
              "degrees do not divide it):")
        for w, text in elastic.items():
            print(f"  {w:>4} workers: {text}")
    print("\n" + memory_text(run, world), end="")
    print("\nresolved config:\n" + yaml.safe_dump(run.resolved(), sort_keys=False), end="", flush=True)
    check_fits(run)
    return 0


def plan_command(run: RunConfig, args: argparse.Namespace) -> int:
    from .planning import auto_gpu, no_layout_error, parse_only, plan, plan_json, plan_text

    if args.gpus < 1 or args.top < 0 or (args.gpus_per_node is not None and args.gpus_per_node < 1):
        raise ConfigError(f"--gpus={args.gpus} --top={args.top} --gpus-per-node={args.gpus_per_node}: "
                          "need gpus >= 1, top >= 0, gpus-per-node >= 1")
    gpu = args.gpu or auto_gpu(run)
    per_node = args.gpus_per_node or (args.gpus if gpu == "cpu" else 8)
    calibrated = None
    if args.calibrate:
        from engine.planner.calibrate import calibrate
        from engine.planner.calibrate_ranks import CalibrationUnavailable
        try:
            calibrated = calibrate(device="cpu" if gpu == "cpu" else "cuda", progress=not args.json,
                                   model=run.model, train=run.train)
        except CalibrationUnavailable as err:
            raise ConfigError(f"--calibrate --gpu {gpu}: {err}") from None
    only = parse_only(args.only)
    result = plan(run, args.gpus, gpu=gpu, gpus_per_node=per_node, only=only, calibrated=calibrated)
    if args.json:
        print(plan_json(result, args.top))
    elif not result.rows:
        raise no_layout_error(run, args.gpus, result, only)     # no empty table before it
    else:
        if run.schema.parallel.auto:
            print(f"parallel.auto: micro-batch size {run.train.micro_batch_size} and recompute "
                  f"{run.train.recompute} are the config's; the planner picks the degrees")
        print(plan_text(result, args.gpus, gpu if calibrated is None else f"{gpu} (calibrated)",
                        args.top), end="")
    if not result.rows:
        raise no_layout_error(run, args.gpus, result, only)
    return 0


def main(argv: list[str] | None = None) -> int:
    driver_start = time.time()
    args = _parser().parse_args(argv)
    if args.command == "train":
        return run_train_args(args, driver_start)
    if args.command == "export":
        return export_command(args)
    if args.command == "eval":
        return eval_command(args)
    try:
        run = load_config(args.config, args.overrides)
        if args.command == "plan":
            return plan_command(run, args)
        return validate_command(run, args.json)
    except ConfigError as err:
        print(f"{err.kind}: {err}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())

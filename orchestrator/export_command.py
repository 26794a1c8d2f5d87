"""`foldmoe export CHECKPOINT_STEP_DIR OUT_DIR`: a checkpoint of any layout -> an HF model
directory (config.json, size-split safetensors, model.safetensors.index.json)."""
from __future__ import annotations

import argparse
import os
import re
import sys

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count (Hugging Face's max_shard_size spelling)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size like 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def add_export_parser(sub) -> None:
    export = sub.add_parser("export", help="write a checkpoint as a Hugging Face model directory")
    export.add_argument("checkpoint", metavar="CHECKPOINT_STEP_DIR", help="e.g. checkpoints/run/step00000100")
    export.add_argument("out_dir", metavar="OUT_DIR")
    export.add_argument("--model-type", choices=["mixtral", "qwen2_moe", "qwen3_moe"], default=None,
                        help="HF family (default: inferred from the model's features)")
    export.add_argument("--max-shard-size", type=parse_size, default=parse_size("5GB"),
                        help="largest safetensors file (default 5GB)")


def export_command(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from engine.hf.config import HFConfigError
    from engine.hf.export import ExportError, export_checkpoint

    if not os.path.isdir(args.checkpoint):
        print(f"export error: {args.checkpoint}: not a directory", file=sys.stderr)
        return 2
    bar = tqdm(desc="export", unit="tensor", file=sys.stderr, disable=not sys.stderr.isatty())

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        index = export_checkpoint(args.checkpoint, args.out_dir, model_type=args.model_type,
                                  max_file_bytes=args.max_shard_size, progress=progress)
    except (ExportError, HFConfigError) as err:
        print(f"export error: {err}", file=sys.stderr)
        return 2
    finally:
        bar.close()
    files = len(set(index["weight_map"].values()))
    print(f"exported {len(index['weight_map'])} tensors ({index['metadata']['total_size']} bytes) "
          f"in {files} file(s) to {args.out_dir}")
    return 0

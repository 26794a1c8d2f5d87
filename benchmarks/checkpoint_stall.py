"""Checkpoint stall: how long a save holds training up, synchronous against asynchronous
(engine/checkpoint/async_writer.py), next to the time the write itself takes, and the step
time while a background write runs. One process (world-1 gloo), one thread, the real
CheckpointManager and Trainer.checkpoint_state(); rounds interleave the two modes.

Models: `tiny` (the tiny-moe preset) and `mixtral` (benchmarks/step_vs_hf.py's scaled-down
Mixtral, ~46M parameters, ~0.7 GB of checkpoint state with the AdamW moments). On CUDA the
model sits on the GPU and the snapshot copies into pinned host buffers.

    python -m benchmarks.checkpoint_stall [--rounds 3] [--models tiny,mixtral] [--dir DIR]
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import torch

from benchmarks.common import init_single_process_group, median, one_thread, print_table, write_json
from benchmarks.step_vs_hf import SHAPES
from engine.checkpoint import CheckpointManager
from engine.compose import build_trainer
from engine.config.model import get_preset
from engine.config.train import TrainConfig
from engine.parallel.config import ParallelConfig
from engine.parallel.mesh import FoldedMesh
from engine.testing.parity import synthetic_global_batch

SEQ, BATCH = 64, 2
TRAIN = dict(global_batch_size=BATCH, micro_batch_size=BATCH, seq_len=SEQ, lr=1e-4, min_lr=1e-5,
             warmup_steps=1, weight_decay=0.1, grad_clip=1.0)


def models() -> dict:
    return {"tiny": get_preset("tiny-moe"), "mixtral": SHAPES["mixtral"]}


def state_bytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state["tensors"].values())


def run_model(name: str, cfg, mesh, rounds: int, root: str, device: torch.device) -> dict:
    trainer = build_trainer(cfg, TrainConfig(**TRAIN), mesh, device=device)
    batch = synthetic_global_batch(0, BATCH, SEQ, cfg.vocab_size)
    step = 0

    def train_one() -> float:
        nonlocal step
        start = time.perf_counter()
        trainer.train_step(step, batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        step += 1
        return time.perf_counter() - start

    manager = CheckpointManager(os.path.join(root, name), keep=1, rank=0, world_size=1,
                                barrier=lambda: None)
    train_one()
    manager.save(step, trainer.checkpoint_state(), background=True)   # warm-up: buffers, caches
    manager.flush()
    manager.finished_writes()
    figures = {"sync_stall_s": [], "async_stall_s": [], "async_write_s": [],
               "step_alone_s": [], "step_during_write_s": []}
    for r in range(rounds):
        for mode in (("sync", "async") if r % 2 == 0 else ("async", "sync")):
            figures["step_alone_s"].append(train_one())
            start = time.perf_counter()
            manager.save(step, trainer.checkpoint_state(), background=mode == "async")
            stall = time.perf_counter() - start
            if mode == "async":
                figures["step_during_write_s"].append(train_one())
                manager.flush()
                (write,) = manager.finished_writes()
                figures["async_write_s"].append(write["write_s"])
            else:
                manager.finished_writes()
            figures[f"{mode}_stall_s"].append(stall)
    result = {k: median(v) for k, v in figures.items()}
    result.update(model=name, state_bytes=state_bytes(trainer.checkpoint_state()),
                  params=sum(p.numel() for _, p in trainer.named_params), rounds=rounds,
                  device=str(device))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", default="tiny,mixtral")
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    one_thread()
    init_single_process_group()
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    mesh = FoldedMesh(ParallelConfig(world_size=1))
    root = args.dir or tempfile.mkdtemp(prefix="ckpt-stall-")
    try:
        results = [run_model(name, models()[name], mesh, args.rounds, root, device)
                   for name in args.models.split(",")]
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    print_table(f"checkpoint stall, {device}, median of {args.rounds} rounds (write = safetensors + "
                "fsync + SHA-256 + manifest + rename)",
                ["model", "params", "state MB", "sync stall s", "async stall s", "async write s",
                 "stall ratio", "step alone s", "step during write s"],
                [[r["model"], r["params"], r["state_bytes"] / 1e6, r["sync_stall_s"], r["async_stall_s"],
                  r["async_write_s"], r["async_stall_s"] / r["sync_stall_s"], r["step_alone_s"],
                  r["step_during_write_s"]] for r in results])
    write_json("checkpoint_stall" + ("_cuda" if device.type == "cuda" else ""),
               {"results": results}, args.json)


if __name__ == "__main__":
    main()

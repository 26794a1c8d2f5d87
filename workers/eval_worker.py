"""The per-worker part of `foldmoe eval` (JobSpec.task == "eval"), under any launcher.

Builds the model chunks exactly as a training worker does (same mesh, layout and shard-size
build) but no optimizer (engine/train/model_shards.py: the weights alone, in the model
dtype, so fewer GPUs than training needed can evaluate a checkpoint), takes the weights from the newest checkpoint in checkpoint.dir when there is one
(resharded on load from any layout), else from model.init_from, and runs the forward-only
loss of engine.train.evaluate over the token rows file or the held-out split. Rank 0
appends one "eval" event to the job's event file (how launched workers answer the driver).
"""
from __future__ import annotations

import math
from datetime import timedelta

import torch.distributed as dist

from engine.checkpoint.manager import latest_checkpoint
from engine.compose import build_model
from engine.config.job import JobSpec
from engine.data.eval_data import held_out_batches, pack_rows, read_token_rows
from engine.parallel.mesh import FoldedMesh
from engine.train.evaluate import Evaluator
from engine.train.state import load_model_resharded
from workers.events import EventWriter
from workers.loop import pretrained_weights, worker_device


def eval_batches(spec: JobSpec) -> list:
    train = spec.train
    if spec.eval_tokens:
        rows = read_token_rows(spec.eval_tokens, spec.model.vocab_size, train.seq_len)
        return pack_rows(rows, train.global_batch_size, train.seq_len)
    return held_out_batches(spec.data_dir, train.seq_len, train.eval_batches, train.global_batch_size)


def run_eval(spec: JobSpec) -> dict:
    """{"loss", "tokens", "perplexity", "weights", "step"} on every rank; rank 0 also writes it
    as an "eval" event."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = worker_device(spec)
    mesh = FoldedMesh(spec.parallel_config(world), timeout=timedelta(seconds=spec.collective_timeout_s))
    checkpoint = latest_checkpoint(spec.checkpoint_dir)
    model = build_model(spec.model, spec.train, mesh, dispatcher=spec.dispatcher,
                        attention_backend=spec.attention_backend, device=device,
                        weights=pretrained_weights(spec))
    if checkpoint is not None:
        load_model_resharded(model, checkpoint)
    total, tokens = Evaluator(model).loss_sum(eval_batches(spec))
    loss = total / tokens
    result = {"loss": loss, "tokens": tokens,
              "perplexity": math.exp(loss) if loss < 700 else math.inf,
              "weights": checkpoint or spec.init_from, "step": model.completed_steps}
    if rank == 0 and spec.events_path:
        EventWriter(spec.events_path).write("eval", **result)
    return result

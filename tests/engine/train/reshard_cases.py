"""Worker side of the reshard matrix: save at layout A after K steps, continue 3 steps at A;
load the checkpoint at layout B, continue 3 steps at B; return what the tests compare.

One spawned group runs every case of its world size (save side and load side), so the
matrix costs four spawns. The model, data and optimizer settings are those of the
whole-model parity tests (engine/testing/parity.py: Adam eps=1e-3, fp32 unless a case says
bf16); each layout gets micro_batch_size = global_micro_batch / dp, so every layout sees the
same global micro-batches (engine/testing/layouts.py).
"""
from __future__ import annotations

import functools
import json
import os

import torch
import torch.distributed as dist

from engine.checkpoint import CheckpointManager
from engine.compose import build_model, build_trainer
from engine.config.model import get_preset
from engine.config.train import TrainConfig
from engine.parallel.config import ParallelConfig
from engine.parallel.mesh import FoldedMesh
from engine.testing.layouts import dp_of
from engine.testing.parity import synthetic_global_batch
from engine.data.eval_data import EvalBatch
from engine.train.evaluate import Evaluator
from engine.train.state import checkpoint_state, load_model_resharded, load_resharded, model_state

K_STEPS, MORE_STEPS = 1, 3
MODEL = dict(moe_expert_bias=True, moe_score_func="sigmoid", tie_embeddings=True)
TRAIN = dict(global_batch_size=8, seq_len=8, lr=1e-3, eps=1e-3, warmup_steps=1,
             steps=K_STEPS + MORE_STEPS, weight_decay=0.1, grad_clip=1.0)
GLOBAL_MICRO_BATCH = 4


def _configs(world: int, layout: dict):
    layout = dict(layout)
    train = dict(TRAIN, micro_batch_size=GLOBAL_MICRO_BATCH // dp_of(world, layout),
                 zero1=layout.pop("zero1", False), precision=layout.pop("precision", "fp32"))
    model_cfg = get_preset("tiny-moe", **MODEL)
    return model_cfg, TrainConfig(**train), FoldedMesh(ParallelConfig(world_size=world, **layout))


def _trainer(world: int, layout: dict):
    model_cfg, train, mesh = _configs(world, layout)
    return build_trainer(model_cfg, train, mesh), model_cfg


def _eval_loss(model, model_cfg) -> float:
    """Forward-only mean loss of one held-out-like batch (the same tokens for every layout)."""
    tokens = synthetic_global_batch(1000, TRAIN["global_batch_size"], TRAIN["seq_len"], model_cfg.vocab_size)
    weights = torch.ones(tokens.shape)
    weights[:, 0] = 0
    return Evaluator(model).mean_loss([EvalBatch(tokens, weights)])


def _steps(trainer, model_cfg, steps) -> list[dict]:
    out = []
    for step in steps:
        batch = synthetic_global_batch(step, TRAIN["global_batch_size"], TRAIN["seq_len"],
                                       model_cfg.vocab_size)
        metrics = trainer.train_step(step, batch)
        out.append({"loss": metrics["loss"], "grad_norm": metrics["grad_norm"]})
    return out


def _without_rng(state: dict) -> dict:
    # Cloned: on the CPU checkpoint_state returns views that the next steps update in place.
    return {"tensors": {k: v.clone() for k, v in state["tensors"].items() if not k.startswith("rng/")},
            "shards": state["shards"], "adam_step": state["meta"]["optim_scalars"]["adam_step"]}


DATA_STATE = {"consumed_samples": 96, "global_batch_size": 32, "seq_len": 16, "seed": 3,
              "held_out": 0, "tokens_sha256": "ab12"}


def save_side(rank: int, world: int, layout: dict, ckpt_dir: str) -> dict:
    """Trains K steps at A, saves, continues MORE_STEPS at A. layout["legacy"] saves in the
    format of before resharding (no shard entries for optimizer tensors)."""
    layout = dict(layout)
    legacy = layout.pop("legacy", False)
    trainer, model_cfg = _trainer(world, layout)
    _steps(trainer, model_cfg, range(K_STEPS))
    trainer.completed_steps = K_STEPS
    trainer.data_state = DATA_STATE          # the loop's data position rides in the meta
    manager = CheckpointManager(ckpt_dir, keep=0, rank=rank, world_size=world, barrier=dist.barrier)
    state = checkpoint_state(trainer)
    if legacy:
        state["shards"] = {k: v for k, v in state["shards"].items() if not k.startswith("optim/")}
    manager.save(K_STEPS, state)
    eval_loss = _eval_loss(trainer, model_cfg)
    return {"continued": _steps(trainer, model_cfg, range(K_STEPS, K_STEPS + MORE_STEPS)),
            "eval_loss": eval_loss}


def load_side(rank: int, world: int, layout: dict, ckpt_dir: str) -> dict:
    """Loads the checkpoint at B; returns this rank's state right after loading (as it
    would save it) and the MORE_STEPS that follow. layout["model_only"]: the optimizer-free
    ModelShards of `foldmoe eval` and load_model_resharded; then the eval loss instead."""
    layout = {k: v for k, v in layout.items() if k != "legacy"}
    path = CheckpointManager(ckpt_dir, keep=0, rank=rank, world_size=world,
                             barrier=dist.barrier).latest()
    if layout.pop("model_only", False):
        model_cfg, train, mesh = _configs(world, layout)
        model = build_model(model_cfg, train, mesh)
        info = load_model_resharded(model, path)
        tensors, shards = model_state(model.chunks)
        return {"loaded": {"tensors": {k: v.clone() for k, v in tensors.items()}, "shards": shards},
                "info": info, "eval_loss": _eval_loss(model, model_cfg),
                "has_optimizer": hasattr(model, "optimizer")}
    trainer, model_cfg = _trainer(world, layout)
    info = load_resharded(trainer, path)
    loaded = _without_rng(checkpoint_state(trainer))
    continued = _steps(trainer, model_cfg, range(info["step"], info["step"] + MORE_STEPS))
    return {"loaded": loaded, "continued": continued, "info": info, "data_state": trainer.data_state}


def run_cases(rank: int, world: int, saves: list, loads: list) -> dict:
    """saves: [(name, layout, dir)] run at this world size; loads: [(name, layout, dir)]."""
    out = {}
    for name, layout, ckpt_dir in saves:
        out[f"save:{name}"] = save_side(rank, world, layout, ckpt_dir)
    for name, layout, ckpt_dir in loads:
        out[f"load:{name}"] = load_side(rank, world, layout, ckpt_dir)
    return out


@functools.cache
def global_shapes() -> dict[str, tuple[int, ...]]:
    """Global shape of every model tensor, from the whole model built on the meta device."""
    from engine.models.transformer import MoETransformer

    model_cfg = get_preset("tiny-moe", **MODEL)
    with torch.device("meta"):
        full = MoETransformer(model_cfg, list(range(model_cfg.num_layers)),
                              first_stage=True, last_stage=True)
    return {name: tuple(t.shape) for name, t in full.state_dict().items()}


def global_index(shape, info: dict) -> torch.Tensor:
    """Global flat index of each element of a stored tensor: the recorded slices applied to
    an index tensor (engine.parallel.param_attrs.apply_slices, independent of the loader)."""
    from engine.parallel.param_attrs import apply_slices

    numel = int(torch.tensor(shape).prod())
    recorded = [(d, tuple(s) if isinstance(s, list) else s, n) for d, s, n in info["slices"]]
    index = apply_slices(torch.arange(numel).view(shape), recorded).flatten()
    lo, hi = info.get("flat_range") or (0, index.numel())
    return index[lo:hi]


def global_tensors(ckpt_path: str, shapes: dict) -> dict[str, torch.Tensor]:
    """Every saved tensor assembled, flat, to its global size (test side, parent process);
    replicas must agree bit for bit and every element must be saved by some rank."""
    from safetensors.torch import load_file

    out, written = {}, {}
    rank = 0
    while os.path.exists(os.path.join(ckpt_path, f"rank{rank:05d}.json")):
        with open(os.path.join(ckpt_path, f"rank{rank:05d}.json")) as handle:
            shards = json.load(handle)["shards"]
        tensors = load_file(os.path.join(ckpt_path, f"rank{rank:05d}.safetensors"))
        for key, info in shards.items():
            shape = shapes[key.split("/")[-1]]
            index, value = global_index(shape, info), tensors[key].flatten()
            if key not in out:
                out[key] = torch.zeros(int(torch.tensor(shape).prod()), dtype=value.dtype)
                written[key] = torch.zeros(out[key].numel(), dtype=torch.bool)
            seen = written[key][index]
            assert torch.equal(out[key][index][seen], value[seen]), f"replicas of {key} differ"
            out[key][index] = value
            written[key][index] = True
        rank += 1
    assert all(bool(w.all()) for w in written.values()), "a saved tensor has holes"
    return out


def assert_loaded_equals_saved(loaded_per_rank: list[dict], saved: dict, shapes: dict) -> int:
    """Every tensor a B rank holds right after loading equals, bit for bit, its part of the
    global tensors A saved; returns the number of elements compared."""
    compared = 0
    for state in loaded_per_rank:
        for key, tensor in state["tensors"].items():
            info = state["shards"][key]
            expected = saved[key][global_index(shapes[key.split("/")[-1]], info)]
            assert torch.equal(tensor.flatten(), expected), key
            compared += tensor.numel()
    return compared

"""What a rank puts in a checkpoint: its model shards (params and buffers), its optimizer
shard, RNG states and the step. Shard metadata records where each local tensor sits in
the global tensor, for inspection and future resharding."""
from __future__ import annotations

import dataclasses

import torch

from engine.checkpoint import capture_rng_state, restore_rng_state
from engine.parallel.param_attrs import is_expert, reduce_axes, slices

_LAYOUT_KEYS = ("world_size", "tp", "cp", "pp", "ep", "etp", "vpp")


def layout_of_config(parallel_cfg) -> dict:
    """The layout a checkpoint records and a resume must match."""
    return {key: getattr(parallel_cfg, key) for key in _LAYOUT_KEYS}


def layout_of(trainer) -> dict:
    return layout_of_config(trainer.mesh.config)


def _shard_info(name: str, tensor: torch.Tensor, param) -> dict:
    """Where the local tensor sits in the global one: the recorded slices, applied in order."""
    if param is None:   # buffers (e.g. expert bias) are replicated
        return {"local_shape": list(tensor.shape), "slices": [], "axes": []}
    recorded = [[d, list(s) if isinstance(s, tuple) else s, n] for d, s, n in slices(param)]
    return {"local_shape": list(tensor.shape), "slices": recorded, "axes": [str(axis) for axis in reduce_axes(param)],
            "expert": is_expert(param)}


def checkpoint_state(trainer) -> dict:
    tensors, shards = {}, {}
    for chunk in trainer.chunks:
        params = dict(chunk.named_parameters())
        for name, tensor in chunk.state_dict().items():
            key = f"model/{name}"
            tensors[key] = tensor.detach().cpu().contiguous()
            shards[key] = _shard_info(name, tensor, params.get(name))
    optim = trainer.optimizer.state_dict()
    optim_scalars = {}
    for name, value in optim.items():
        if isinstance(value, torch.Tensor):
            tensors[f"optim/{name}"] = value.detach().cpu().contiguous()
        else:
            optim_scalars[name] = value
    tensors.update(capture_rng_state())
    meta = {"step": int(getattr(trainer, "completed_steps", 0)), "layout": layout_of(trainer),
            "model": dataclasses.asdict(trainer.model_cfg),   # lets `foldmoe export` rebuild shapes
            "optim_scalars": optim_scalars, "rank": trainer.mesh.rank}
    return {"tensors": tensors, "shards": shards, "meta": meta}


def load_checkpoint_state(trainer, state: dict) -> None:
    saved, current = state["meta"]["layout"], layout_of(trainer)
    if saved != current:
        diff = {k: (saved.get(k), current[k]) for k in current if saved.get(k) != current[k]}
        raise ValueError(
            f"checkpoint layout {diff} (saved, current) differs from this run; resuming with a "
            "different world size or layout is not supported yet")
    tensors = state["tensors"]
    for chunk in trainer.chunks:
        own = chunk.state_dict()
        missing = [n for n in own if f"model/{n}" not in tensors]
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} model tensors, e.g. {missing[:3]}")
        chunk.load_state_dict({n: tensors[f"model/{n}"].to(own[n].dtype) for n in own})
    optim = {k[len("optim/"):]: v for k, v in tensors.items() if k.startswith("optim/")}
    optim.update(state["meta"].get("optim_scalars", {}))
    trainer.optimizer.load_state_dict(optim)
    restore_rng_state({k: v for k, v in tensors.items() if k.startswith("rng/")})
    trainer.completed_steps = int(state["meta"]["step"])

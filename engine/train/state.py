"""What a rank puts in a checkpoint: its model shards (params and buffers), its optimizer
shard, RNG states and the step; and how a checkpoint of any layout is loaded back.

Shard metadata records where each local tensor sits in the global tensor: the param's
slices, and for optimizer tensors also the flat range of the local param they hold. The
loader (load_resharded) fills every local tensor from the saved shards that overlap it
(engine/checkpoint/reshard.py), so world size, TP/CP/PP/VPP/EP/ETP, ZeRO-1 and the
bucketing may all differ between the save and the load."""
from __future__ import annotations

import dataclasses

import torch

from engine.checkpoint import CheckpointError, capture_rng_state, restore_rng_state
from engine.checkpoint.reshard import ReshardReader
from engine.checkpoint.rng import CPU_KEY
from engine.config.model import shape_differences
from engine.optim.state import owned_views
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


def model_state(chunks) -> tuple[dict, dict]:
    """({"model/<name>": tensor}, {"model/<name>": shard info}) of the chunks' params and buffers."""
    tensors, shards = {}, {}
    for chunk in chunks:
        params = dict(chunk.named_parameters())
        for name, tensor in chunk.state_dict().items():
            key = f"model/{name}"
            tensors[key] = tensor.detach()   # on its device: the saver copies to host (pinned)
            shards[key] = _shard_info(name, tensor, params.get(name))
    return tensors, shards


def checkpoint_state(trainer) -> dict:
    trainer.optimizer.wait_params()     # train.overlap_param_gather: the gathers of the last step
    tensors, shards = model_state(trainer.chunks)
    optim = trainer.optimizer.state_dict()
    optim_scalars = {}
    for name, value in optim.items():
        if isinstance(value, torch.Tensor):
            tensors[f"optim/{name}"] = value.detach()
            param_name = name.split("/", 1)[1]
            lo, hi, _ = optim[f"range/{param_name}"]
            shards[f"optim/{name}"] = dict(shards[f"model/{param_name}"], flat_range=[lo, hi])
        else:
            optim_scalars[name] = value
    tensors.update(capture_rng_state())
    meta = {"step": int(getattr(trainer, "completed_steps", 0)), "layout": layout_of(trainer),
            "model": dataclasses.asdict(trainer.model_cfg),   # lets `foldmoe export` rebuild shapes
            "optim_scalars": optim_scalars, "rank": trainer.mesh.rank,
            "data": dict(getattr(trainer, "data_state", {}))}
    return {"tensors": tensors, "shards": shards, "meta": meta}


def load_checkpoint_state(trainer, state: dict) -> None:
    trainer.optimizer.wait_params()     # a pending gather would overwrite the loaded params
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
    trainer.data_state = dict(state["meta"].get("data") or {})


def load_resharded(trainer, path: str) -> dict:
    """Loads the checkpoint at `path`, written by any layout of the same model, into this
    rank's params, buffers, optimizer state (master weights, both Adam moments, the AdamW
    step), RNG state and step. Returns {"step", "files_read", "saved_world_size"}."""
    trainer.optimizer.wait_params()     # a pending gather would overwrite the loaded params
    reader = _reader_for(trainer, path)
    meta = reader.rank_meta[0]
    if not any(key.startswith("optim/") for key in reader.shards):
        return _load_unsharded_format(trainer, reader)
    params = dict(trainer.named_params)
    with torch.no_grad():
        _fill_model(reader, trainer.chunks, params)
        for bucket in trainer.optimizer.buckets:
            for name, (lo, hi, _), views in owned_views(bucket):
                param = params[name]
                for kind, view in views.items():
                    key = f"optim/{kind}/{name}"
                    if kind == "main_param" and not reader.has(key):
                        key = f"model/{name}"      # saved in fp32: the param is the master
                    reader.fill_(key, view, slices(param), param.shape, (lo, hi))
    trainer.optimizer.adam_step = int(meta["optim_scalars"]["adam_step"])
    if trainer.mesh.rank < reader.saved_world:
        # The same rank's generator: exact for an unchanged layout; for a new layout the
        # random streams do not correspond anyway (the tiny presets draw none in training).
        restore_rng_state({CPU_KEY: reader.read_rank_tensor(trainer.mesh.rank, CPU_KEY)})
    trainer.completed_steps = int(reader.manifest["step"])
    trainer.data_state = dict(meta.get("data") or {})
    return _load_info(trainer, reader)


def load_model_resharded(model, path: str) -> dict:
    """Loads only the params and buffers of the checkpoint at `path` (any layout of the same
    model, either format) into `model` (engine.train.model_shards.ModelShards: no optimizer),
    and its step. The Adam moments are never read, the fp32 master weights only where
    load_resharded would take a param from them (fp32 params from a bf16 checkpoint).
    Returns load_resharded's dict."""
    reader = _reader_for(model, path)
    with torch.no_grad():
        _fill_model(reader, model.chunks, dict(model.named_params))
    model.completed_steps = int(reader.manifest["step"])
    return _load_info(model, reader)


def _reader_for(model, path: str) -> ReshardReader:
    reader = ReshardReader(path, model.mesh.rank)
    differences = shape_differences(reader.rank_meta[0].get("model") or {}, model.model_cfg)
    if differences:
        raise CheckpointError(f"{path} holds another model: {differences} (saved, current)")
    return reader


def _load_info(model, reader: ReshardReader) -> dict:
    return {"step": model.completed_steps, "files_read": sorted(reader.files_read),
            "saved_world_size": reader.saved_world}


def _fill_model(reader: ReshardReader, chunks, params: dict) -> None:
    for chunk in chunks:
        for name, tensor in chunk.state_dict(keep_vars=True).items():
            _fill_model_tensor(reader, name, tensor.data, params.get(name))


def _fill_model_tensor(reader, name: str, tensor: torch.Tensor, param) -> None:
    """A param from the saved params, or from the saved fp32 master weights when this run
    keeps the params in fp32 and the checkpoint holds them in a lower precision."""
    recorded = slices(param) if param is not None else ()
    master = f"optim/main_param/{name}"
    if tensor.dtype == torch.float32 and reader.has(master):
        reader.fill_(master, tensor, recorded, tensor.shape)
    else:
        reader.fill_(f"model/{name}", tensor, recorded, tensor.shape)


def _load_unsharded_format(trainer, reader) -> dict:
    """Checkpoints written before optimizer tensors had shard entries: loadable into the
    layout that wrote them only (their optimizer state says nothing about other layouts)."""
    rank = trainer.mesh.rank
    if reader.saved_world != trainer.mesh.config.world_size:
        raise CheckpointError(f"{reader.path}: written by world size {reader.saved_world} in the "
                              "format without optimizer shard entries; it loads only at that world "
                              f"size and layout, not at {trainer.mesh.config.world_size}")
    load_checkpoint_state(trainer, {"tensors": reader.read_rank_tensors(rank),
                                    "meta": reader.rank_meta[rank]})
    return _load_info(trainer, reader)

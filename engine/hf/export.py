"""Exports a foldmoe checkpoint of any layout as a Hugging Face model directory.

Streaming: for each HF tensor (one per expert for stacked experts) the output is allocated
once, in HF layout, and every distinct shard that covers it is read from its rank file with
safetensors slicing (only the rows of that expert) and written into place; the tensor is
then appended to the open output file. Peak memory is one HF tensor plus one shard read.
Replicas (DP/EDP copies, kv heads repeated over TP) are read once: shards are deduplicated
by their recorded slices.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from safetensors import safe_open

from engine.config.model import ModelConfig, MoEConfig
from engine.models.init import global_coords
from engine.models.transformer import MoETransformer

from engine.checkpoint.fallback import verify_structure
from engine.checkpoint.files import fsync_file, write_json_durable
from engine.checkpoint.manager import CheckpointError, verify_file

from .config import hf_config_from_model, model_type_of
from .hf_publish import CONFIG_NAME, INDEX_NAME, ExportError, publish, staging_dir
from .names import hf_tensor_map, rope_rows_to_hf
from .stream_writer import StreamingSafetensorsWriter, read_header, read_rows, tensor_bytes

_MODEL_PREFIX = "model/"


@dataclass(frozen=True)
class Shard:
    path: str           # rank safetensors file
    key: str            # "model/<name>"
    slices: tuple       # recorded (dim, start, length) / (dim, indices, None)


@dataclass(frozen=True)
class HFTensor:
    hf_name: str
    name: str                  # foldmoe tensor
    expert: int | None         # stacked experts: which one
    shape: tuple[int, ...]     # HF shape
    dtype: torch.dtype


def _freeze(slices) -> tuple:
    return tuple((d, tuple(s) if isinstance(s, list) else s, n) for d, s, n in slices)


def read_checkpoint_layout(step_dir: str) -> tuple[ModelConfig, dict[str, list[Shard]], dict[str, torch.dtype]]:
    """(model config, distinct shards per foldmoe tensor, dtype per tensor) of a step dir."""
    rank_files = sorted(f for f in os.listdir(step_dir) if f.startswith("rank") and f.endswith(".json")
                        and not f.endswith(".sha256.json"))
    if not rank_files:
        raise ExportError(f"{step_dir}: no rank*.json files; not a foldmoe checkpoint step directory")
    shards: dict[str, list[Shard]] = {}
    dtypes: dict[str, torch.dtype] = {}
    model = None
    for json_name in rank_files:
        with open(os.path.join(step_dir, json_name), encoding="utf-8") as handle:
            side = json.load(handle)
        model = model or side["meta"].get("model")
        path = os.path.join(step_dir, json_name[:-len(".json")] + ".safetensors")
        with safe_open(path, "pt") as handle:
            for key in handle.keys():
                if not key.startswith(_MODEL_PREFIX):
                    continue
                shard = Shard(path, key, _freeze(side["shards"][key]["slices"]))
                name = key[len(_MODEL_PREFIX):]
                if shard.slices not in {s.slices for s in shards.get(name, [])}:
                    shards.setdefault(name, []).append(shard)
                    dtypes.setdefault(name, handle.get_slice(key).get_dtype())
    if model is None:
        raise ExportError(f"{step_dir}: the checkpoint records no model config (written before export support)")
    moe = MoEConfig(**model.pop("moe"))
    return ModelConfig(**model, moe=moe), shards, {k: _torch_dtype(v) for k, v in dtypes.items()}


_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _torch_dtype(code: str) -> torch.dtype:
    return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[code]


def full_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = MoETransformer(cfg)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def plan_tensors(cfg: ModelConfig, model_type: str, dtypes: dict[str, torch.dtype]) -> list[HFTensor]:
    out = []
    for name, shape in full_shapes(cfg).items():
        spec = hf_tensor_map(name, model_type, cfg.dim_head)
        if spec is None:
            continue
        if name not in dtypes:
            raise ExportError(f"checkpoint lacks tensor {name!r}")
        if spec.stacked_experts:
            hf_shape = shape[1:][::-1]
            out += [HFTensor(spec.hf_name.format(expert=e), name, e, hf_shape, dtypes[name])
                    for e in range(shape[0])]
        else:
            out.append(HFTensor(spec.hf_name, name, None, shape[::-1] if spec.transpose else shape,
                                dtypes[name]))
    return out


def assemble(tensor: HFTensor, shards: list[Shard], cfg: ModelConfig, model_type: str,
             full_shape: tuple[int, ...], buffer_bytes: int = 16 * 2**20) -> torch.Tensor:
    """The whole HF tensor from the distinct shards that cover it, each read in row blocks of
    at most `buffer_bytes` (so memory is the output plus one buffer)."""
    spec = hf_tensor_map(tensor.name, model_type, cfg.dim_head)
    out = torch.empty(tensor.shape, dtype=tensor.dtype)
    written = 0
    for shard in shards:
        coords = global_coords(full_shape, shard.slices, "cpu")
        expert = None
        if spec.stacked_experts:
            hits = (coords[0] == tensor.expert).nonzero().flatten().tolist()
            if not hits:
                continue
            expert, coords = hits[0], coords[1:]
        written += _read_shard(out, shard, expert, coords, spec, buffer_bytes)
    if written != out.numel():
        raise ExportError(f"{tensor.hf_name}: the checkpoint's shards of {tensor.name!r} cover "
                          f"{written} of {out.numel()} values")
    return out


def _read_shard(out, shard: Shard, expert: int | None, coords, spec, buffer_bytes: int) -> int:
    data_start, header = read_header(shard.path)
    entry = header[shard.key]
    if not coords:                                   # a 0-d tensor
        return _place(out, read_rows(shard.path, data_start, {**entry, "shape": [1]}, (), 0, 1)[0], [], spec)
    rows = len(coords[0])
    row_elems = 1
    for c in coords[1:]:
        row_elems *= len(c)
    step = max(1, buffer_bytes // (row_elems * out.element_size()))
    prefix = () if expert is None else (expert,)
    written = 0
    for lo in range(0, rows, step):
        hi = min(rows, lo + step)
        # Plain reads, not safetensors' memory map: the pages a map has touched stay resident
        # while it is open, which would add the shard's size to the peak.
        block = read_rows(shard.path, data_start, entry, prefix, lo, hi)
        written += _place(out, block, [coords[0][lo:hi], *coords[1:]], spec)
    return written


def _place(out: torch.Tensor, block: torch.Tensor, coords: list[torch.Tensor], spec) -> int:
    """Writes a block (foldmoe layout, at global coords) into the HF-layout output."""
    if not coords:
        out.copy_(block)
        return out.numel()
    if spec.rope_head_dim is not None:
        coords = [rope_rows_to_hf(coords[0], spec.rope_head_dim), *coords[1:]]
    if spec.transpose:
        block, coords = block.T, coords[::-1]
    out[_index(coords)] = block
    return block.numel()


def _index(coords: list[torch.Tensor]) -> tuple:
    """Slices for contiguous coordinates (no index tensors of the block's size), broadcast
    index tensors for the others."""
    def contiguous(c):
        return c.numel() > 0 and torch.equal(c, torch.arange(int(c[0]), int(c[0]) + c.numel()))
    parts = [slice(int(c[0]), int(c[0]) + c.numel()) if contiguous(c) else c for c in coords]
    tensors = [d for d, p in enumerate(parts) if isinstance(p, torch.Tensor)]
    if len(tensors) > 1:
        for d in tensors:
            parts[d] = parts[d].view([-1 if i == d else 1 for i in tensors])
    return tuple(parts)


def split_files(tensors: list[HFTensor], max_file_bytes: int) -> list[list[HFTensor]]:
    files, current, size = [], [], 0
    for tensor in tensors:
        nbytes = tensor_bytes(tensor.shape, tensor.dtype)
        if current and size + nbytes > max_file_bytes:
            files.append(current)
            current, size = [], 0
        current.append(tensor)
        size += nbytes
    return files + [current] if current else files


def verified_manifest(step_dir: str) -> dict:
    """The manifest after the checks that read no tensor data (every file there, at its
    recorded size): a killed or edited checkpoint is refused before anything is opened."""
    names = os.listdir(step_dir)
    if "manifest.json" not in names and not any(n.startswith("rank") for n in names):
        raise ExportError(f"{step_dir}: no manifest.json and no rank files; not a foldmoe "
                          "checkpoint step directory (e.g. checkpoints/run/step00000100)")
    try:
        return verify_structure(step_dir)[0]
    except CheckpointError as err:
        raise ExportError(str(err)) from None


def verify_read_files(step_dir: str, manifest: dict, shards: dict[str, list[Shard]]) -> None:
    """The SHA-256 of the rank files the export reads (replica-only files are skipped): a
    bit-rotted checkpoint is refused, never published as a model."""
    try:
        for path in sorted({shard.path for group in shards.values() for shard in group}):
            verify_file(step_dir, os.path.basename(path), manifest)
    except CheckpointError as err:
        raise ExportError(str(err)) from None


def export_checkpoint(step_dir: str, out_dir: str, *, model_type: str | None = None,
                      max_file_bytes: int = 5 * 2**30, buffer_bytes: int = 16 * 2**20,
                      progress=None) -> dict:
    """Writes config.json, model-XXXXX-of-YYYYY.safetensors and model.safetensors.index.json
    into a temporary sibling of `out_dir`, then moves them in (hf_publish.py): an export
    that fails or is killed leaves `out_dir` as it was. `progress(done, total)` is called
    after each tensor. Returns the index."""
    manifest = verified_manifest(step_dir)
    cfg, shards, dtypes = read_checkpoint_layout(step_dir)
    model_type = model_type or model_type_of(cfg)
    hf_config = hf_config_from_model(cfg, model_type)
    tensors = plan_tensors(cfg, model_type, dtypes)
    verify_read_files(step_dir, manifest, shards)
    with staging_dir(out_dir) as tmp:
        index = _write_model(tmp, cfg, model_type, tensors, shards, max_file_bytes, buffer_bytes, progress)
        hf_config["dtype"] = hf_config["torch_dtype"] = _DTYPE_NAMES[tensors[0].dtype]
        write_json_durable(os.path.join(tmp, CONFIG_NAME), hf_config)
        write_json_durable(os.path.join(tmp, INDEX_NAME), index)
        publish(tmp, out_dir)
    return index


def _write_model(tmp: str, cfg: ModelConfig, model_type: str, tensors: list[HFTensor],
                 shards: dict[str, list[Shard]], max_file_bytes: int, buffer_bytes: int, progress) -> dict:
    shapes = full_shapes(cfg)
    groups = split_files(tensors, max_file_bytes)
    weight_map, done = {}, 0
    for number, group in enumerate(groups, start=1):
        file_name = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        entries = [(t.hf_name, t.shape, t.dtype) for t in group]
        with StreamingSafetensorsWriter(os.path.join(tmp, file_name), entries, {"format": "pt"}) as writer:
            for tensor in group:
                writer.write(tensor.hf_name, assemble(tensor, shards[tensor.name], cfg, model_type,
                                                      shapes[tensor.name], buffer_bytes))
                weight_map[tensor.hf_name] = file_name
                done += 1
                if progress is not None:
                    progress(done, len(tensors))
        fsync_file(os.path.join(tmp, file_name))
    total = sum(tensor_bytes(t.shape, t.dtype) for t in tensors)
    return {"metadata": {"total_size": total}, "weight_map": weight_map}

"""Reads a rank's slices of foldmoe tensors straight from HF safetensors files.

Each shard is described by the full foldmoe shape and the slices the parallel plans
recorded (engine/parallel/param_attrs.py). For every dim the global coordinates of the
local positions are mapped to HF coordinates (names.py), and only the bounding range of
those coordinates is read with `safe_open(...).get_slice(name)[...]`: a rank reads its own
rows, heads and experts, never a whole tensor it does not own (contiguous under every
plan; the GQA kv-replica index slices are contiguous too).
"""
from __future__ import annotations

import json
import os
import re
from typing import Sequence

import torch
from safetensors import safe_open

from engine.config.model import ModelConfig
from engine.models.init import global_coords
from engine.models.transformer import MoETransformer

from .config import model_config_from_hf, read_hf_config
from .names import TensorMap, hf_tensor_map, rope_rows_to_hf

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class HFWeightError(ValueError):
    """A tensor is missing from the HF checkpoint or has an unexpected shape."""


def weight_files(model_dir: str) -> dict[str, str]:
    """HF tensor name -> safetensors path, from the index (or the single file)."""
    index = os.path.join(model_dir, INDEX_FILE)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as handle:
            weight_map = json.load(handle)["weight_map"]
        return {name: os.path.join(model_dir, file) for name, file in weight_map.items()}
    single = os.path.join(model_dir, SINGLE_FILE)
    if not os.path.isfile(single):
        raise HFWeightError(f"{model_dir}: neither {INDEX_FILE} nor {SINGLE_FILE} found")
    with safe_open(single, "pt") as handle:
        return {name: single for name in handle.keys()}


# Tensors some HF checkpoints hold that no model computes with (older RoPE buffers).
_IGNORED = re.compile(r".*\.rotary_emb\.inv_freq")


def hf_names_of(cfg: ModelConfig, model_type: str) -> set[str]:
    """Every HF tensor name the foldmoe model `cfg` reads (names only: a meta-device build)."""
    with torch.device("meta"):
        model = MoETransformer(cfg)
    names = set()
    for name, param in model.named_parameters():
        spec = hf_tensor_map(name, model_type, cfg.dim_head)
        if spec is not None and spec.stacked_experts:
            names.update(spec.hf_name.format(expert=e) for e in range(param.shape[0]))
        elif spec is not None:
            names.add(spec.hf_name)
    return names


def check_names(model_dir: str, cfg: ModelConfig, model_type: str) -> None:
    """Refuses a checkpoint whose tensors are not exactly the ones the model reads: a missing
    one (named now, not by a rank mid-build) or one it would silently leave out (a feature
    foldmoe lacks, or a layout it does not know, e.g. fused experts)."""
    wanted, present = hf_names_of(cfg, model_type), set(weight_files(model_dir))
    if cfg.tie_embeddings:
        present.discard("lm_head.weight")       # some tied checkpoints store the copy too
    missing = sorted(wanted - present)
    unused = sorted(n for n in present - wanted if not _IGNORED.fullmatch(n))
    if missing or unused:
        parts = [f"{len(missing)} tensors missing (e.g. {missing[:3]})"] if missing else []
        parts += [f"{len(unused)} tensors the {model_type} model would not use (e.g. {unused[:3]}): "
                  "a feature foldmoe lacks or a layout it does not read"] if unused else []
        raise HFWeightError(f"{model_dir}: {'; '.join(parts)}")


class HFWeightSource:
    """Fills shards from an HF model directory. Used by engine.compose.materialize_ in place
    of the counter-based initialiser; tensors HF does not hold (expert bias) return False."""

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        self.hf_config = read_hf_config(model_dir)
        self.model_type = self.hf_config["model_type"]
        self.head_dim = model_config_from_hf(self.hf_config).dim_head
        self.files = weight_files(model_dir)
        self._handles: dict[str, object] = {}

    def _slice(self, hf_name: str):
        path = self.files.get(hf_name)
        if path is None:
            raise HFWeightError(f"{self.model_dir}: tensor {hf_name!r} is missing from the checkpoint")
        if path not in self._handles:
            self._handles[path] = safe_open(path, "pt")
        return self._handles[path].get_slice(hf_name)

    @torch.no_grad()
    def fill_(self, out: torch.Tensor, name: str, full_shape: Sequence[int], slices: Sequence[tuple]) -> bool:
        """Writes this rank's part of foldmoe tensor `name` into `out`; False if HF lacks it."""
        spec = hf_tensor_map(name, self.model_type, self.head_dim)
        if spec is None:
            return False
        coords = global_coords(full_shape, slices, "cpu")
        if spec.stacked_experts:
            for local, expert in enumerate(coords[0].tolist()):
                hf_name = spec.hf_name.format(expert=expert)
                out[local].copy_(self._read(hf_name, spec, coords[1:], full_shape[1:]))
        else:
            out.copy_(self._read(spec.hf_name, spec, coords, full_shape))
        return True

    def _read(self, hf_name: str, spec: TensorMap, coords: list[torch.Tensor],
              full_shape: Sequence[int]) -> torch.Tensor:
        """The values at foldmoe coordinates `coords` (one index tensor per dim)."""
        if spec.rope_head_dim is not None:
            coords = [rope_rows_to_hf(coords[0], spec.rope_head_dim), *coords[1:]]
        expected = list(full_shape)
        if spec.transpose:
            coords, expected = coords[::-1], expected[::-1]
        tensor_slice = self._slice(hf_name)
        if list(tensor_slice.get_shape()) != expected:
            raise HFWeightError(f"{self.model_dir}: tensor {hf_name!r} has shape "
                                f"{tuple(tensor_slice.get_shape())}, expected {tuple(expected)}")
        bounds = tuple(slice(int(c.min()), int(c.max()) + 1) if c.numel() else slice(0, 0)
                       for c in coords)
        block = tensor_slice[bounds] if bounds else tensor_slice[:]
        for dim, (c, bound) in enumerate(zip(coords, bounds)):
            local = c - bound.start
            if not torch.equal(local, torch.arange(block.shape[dim])):
                block = block.index_select(dim, local)
        return block.T if spec.transpose else block

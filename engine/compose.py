"""The composition layer: builds this rank's model chunks, applies every parallel plan,
and assembles the Trainer (build_trainer) or, for forward-only work, the optimizer-free
ModelShards (build_model). It sits on top of the engine (it imports models, moe, the
parallel dimensions and train); nothing in the engine imports it.

Shard-size build: each chunk is constructed on the meta device (no storage), every plan is
applied there, recording each parameter's slice of the global tensor, and only then is each
local shard allocated on the target device, in the run's dtype, and initialised from
(seed, name, global index) alone (engine.models.init). No rank ever allocates or generates a
tensor it does not own, and every layout trains the same global model.

The plans are applied in a fixed order:
1. pipeline split: which global layer ids each chunk holds (names stay global);
2. MoE folding: slice experts to this rank's EP/ETP shard, install the dispatcher;
3. tensor + sequence parallelism on attention, dense FFN, shared experts, embedding, head;
4. the attention core: ring / all-to-all CP, or the local block core;
5. the tied-embedding gradient axis; then materialisation in the run's precision.
Each step is a no-op when its axis has size 1. The model code itself holds no parallelism.
"""
from __future__ import annotations

import torch
from torch import nn

from engine.config.model import ModelConfig
from engine.config.train import TrainConfig
from engine.context_parallel import build_cp_attention
from engine.metrics.memory import peak_memory_bytes, reset_peak_memory
from engine.models.init import fill_shard_
from engine.models.transformer import MoETransformer
from engine.moe.parallelize import parallelize_moe
from engine.parallel.axes import Axis
from engine.parallel.mesh import FoldedMesh
from engine.parallel.param_attrs import copy_attrs, reduce_axes, set_reduce_axes, slices
from engine.pipeline.split import split_layers
from engine.tensor_parallel.plan import parallelize_tp
from engine.train.model_shards import ModelShards
from engine.train.trainer import Trainer


def chunk_layer_ids(cfg: ModelConfig, mesh: FoldedMesh, seq_len: int | None = None
                    ) -> list[tuple[int, list[int]]]:
    """(global chunk index, layer ids) for every virtual stage of this PP rank."""
    pp, vpp = mesh.config.pp, mesh.config.vpp
    if pp * vpp == 1:
        return [(0, list(range(cfg.num_layers)))]
    chunks = split_layers(cfg, pp, vpp, seq_len=seq_len)
    return [(v * pp + mesh.pp_rank, chunks[v * pp + mesh.pp_rank]) for v in range(vpp)]


def build_chunks(cfg: ModelConfig, mesh: FoldedMesh, *, seed: int, dispatcher: str = "alltoall",
                 attention_backend: str = "auto", precision: str = "fp32",
                 recompute: str = "none", seq_len: int | None = None,
                 device: torch.device | str = "cpu", weights=None) -> list[MoETransformer]:
    n_chunks = mesh.config.pp * mesh.config.vpp
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    chunks = []
    for index, layer_ids in chunk_layer_ids(cfg, mesh, seq_len):
        stages = dict(first_stage=index == 0, last_stage=index == n_chunks - 1)
        with torch.device("meta"):
            chunk = MoETransformer(cfg, layer_ids, **stages)
            full_shapes = {name: tuple(p.shape) for name, p in chunk.named_parameters()}
        parallelize_chunk(chunk, mesh, dispatcher=dispatcher, attention_backend=attention_backend)
        materialize_(chunk, full_shapes, cfg, seed, torch.device(device), dtype, weights)
        chunk.set_recompute(recompute)
        chunks.append(chunk)
    return chunks


def parallelize_chunk(chunk: MoETransformer, mesh: FoldedMesh, *, dispatcher: str,
                      attention_backend: str) -> None:
    config = mesh.config
    if config.world_size > 1 and chunk.moe_layers():
        parallelize_moe(chunk, mesh, dispatcher=dispatcher)
    chunk.tp_comm = parallelize_tp(chunk, mesh) if config.tp > 1 else None
    _install_attention_cores(chunk, mesh, attention_backend)
    _tag_tied_embedding(chunk, mesh)


def _install_attention_cores(chunk: MoETransformer, mesh: FoldedMesh, backend: str) -> None:
    """Ring / all-to-all / hybrid CP core at cp > 1, the local block core otherwise. Both save
    (q, k, v, out, lse), so no recompute mode ever re-runs the attention forward."""
    for block in chunk.layers.values():
        block.attention.core = build_cp_attention(mesh, backend=backend)


def _tag_tied_embedding(chunk: MoETransformer, mesh: FoldedMesh) -> None:
    """With tied embeddings and PP, the first and last stage each hold the table; their
    gradients are summed over the embedding group so both copies stay identical."""
    if chunk.cfg.tie_embeddings and mesh.config.pp > 1 and chunk.embed is not None:
        weight = chunk.embed.weight
        set_reduce_axes(weight, tuple(reduce_axes(weight)) + (Axis.EMBED,))


@torch.no_grad()
def materialize_(chunk: nn.Module, full_shapes: dict[str, tuple[int, ...]], cfg: ModelConfig,
                 seed: int, device: torch.device, dtype: torch.dtype, weights=None) -> None:
    """Replaces every meta parameter by its local shard on `device` in `dtype` (buffers keep
    their own dtype: the expert bias stays fp32 like the router), keeping the plans' tags.
    `weights` (e.g. engine.hf.reader.HFWeightSource) supplies pretrained values: its
    `fill_(out, name, full_shape, slices)` reads exactly this rank's slices, and returns
    False for a tensor it does not hold, which is then initialised as usual."""
    for prefix, module in chunk.named_modules():
        for key, param in list(module._parameters.items()):
            if param is None:
                continue
            name = f"{prefix}.{key}" if prefix else key
            shard = torch.empty(param.shape, dtype=dtype, device=device)
            if weights is None or not weights.fill_(shard, name, full_shapes[name], slices(param)):
                fill_shard_(shard, name, full_shapes[name], slices(param), cfg, seed)
            new = nn.Parameter(shard, requires_grad=param.requires_grad)
            copy_attrs(param, new)
            module._parameters[key] = new
        for key, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.is_meta:
                name = f"{prefix}.{key}" if prefix else key
                local = torch.empty(buffer.shape, dtype=buffer.dtype, device=device)
                module._buffers[key] = fill_shard_(local, name, buffer.shape, (), cfg, seed)


def build_model(model_cfg: ModelConfig, train_cfg: TrainConfig, mesh: FoldedMesh, *,
                dispatcher: str = "alltoall", attention_backend: str = "auto",
                device: torch.device | None = None, weights=None) -> ModelShards:
    """Validates the model against the mesh's layout and builds this rank's chunks on
    `device`, without an optimizer (forward-only work: engine/train/model_shards.py);
    `weights` is a pretrained source for materialize_ (None: counter-based init)."""
    mesh.config.validate_for_model(
        num_heads=model_cfg.num_heads, num_kv_heads=model_cfg.num_kv_heads,
        num_experts=model_cfg.moe.num_experts, num_layers=model_cfg.num_layers,
        vocab_size=model_cfg.vocab_size)
    device = device or torch.device("cpu")
    torch.manual_seed(train_cfg.seed)
    reset_peak_memory(device)
    chunks = build_chunks(model_cfg, mesh, seed=train_cfg.seed, dispatcher=dispatcher,
                          attention_backend=attention_backend, precision=train_cfg.precision,
                          recompute=train_cfg.recompute, seq_len=train_cfg.seq_len, device=device,
                          weights=weights)
    return ModelShards(model_cfg, train_cfg, mesh, chunks, device, peak_memory_bytes(device))


def build_trainer(model_cfg: ModelConfig, train_cfg: TrainConfig, mesh: FoldedMesh, *,
                  dispatcher: str = "alltoall", attention_backend: str = "auto",
                  device: torch.device | None = None, trainer_cls: type[Trainer] = Trainer,
                  weights=None) -> Trainer:
    """build_model, then the Trainer that steps its chunks. `trainer_cls` lets a harness
    pass a subclass."""
    model = build_model(model_cfg, train_cfg, mesh, dispatcher=dispatcher,
                        attention_backend=attention_backend, device=device, weights=weights)
    return trainer_cls(model_cfg, train_cfg, mesh, model.chunks, device=model.device,
                       build_peak_bytes=model.build_peak_bytes)

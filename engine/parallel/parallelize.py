"""Builds this rank's model chunks and applies every parallel plan, in a fixed order:

1. pipeline split: which global layer ids each chunk holds (names stay global);
2. layout-independent init at full shape (engine.models.init);
3. MoE folding: slice experts to this rank's EP/ETP shard, install the dispatcher;
4. tensor + sequence parallelism on attention, dense FFN, shared experts, embedding, head;
5. the attention core: ring / all-to-all CP, or the local block core;
6. tied-embedding gradient axis and precision.
Each step is a no-op when its axis has size 1. The model code itself holds no parallelism.
"""
from __future__ import annotations

import torch
from torch import nn

from engine.models.config import ModelConfig
from engine.models.init import init_weights
from engine.models.transformer import MoETransformer
from engine.parallel.mesh import FoldedMesh
from engine.parallel.param_attrs import reduce_axes, set_reduce_axes


def chunk_layer_ids(cfg: ModelConfig, mesh: FoldedMesh, seq_len: int | None = None
                    ) -> list[tuple[int, list[int]]]:
    """(global chunk index, layer ids) for every virtual stage of this PP rank."""
    pp, vpp = mesh.config.pp, mesh.config.vpp
    if pp * vpp == 1:
        return [(0, list(range(cfg.num_layers)))]
    from engine.pipeline.split import split_layers
    chunks = split_layers(cfg, pp, vpp, seq_len=seq_len)
    return [(v * pp + mesh.pp_rank, chunks[v * pp + mesh.pp_rank]) for v in range(vpp)]


def build_chunks(cfg: ModelConfig, mesh: FoldedMesh, *, seed: int, dispatcher: str = "alltoall",
                 attention_backend: str = "auto", precision: str = "fp32",
                 recompute: str = "none", seq_len: int | None = None) -> list[MoETransformer]:
    n_chunks = mesh.config.pp * mesh.config.vpp
    chunks = []
    for index, layer_ids in chunk_layer_ids(cfg, mesh, seq_len):
        chunk = MoETransformer(cfg, layer_ids, first_stage=index == 0, last_stage=index == n_chunks - 1)
        init_weights(chunk, cfg, seed)
        parallelize_chunk(chunk, mesh, dispatcher=dispatcher, attention_backend=attention_backend)
        chunk.set_recompute(recompute)
        if precision == "bf16":
            chunk.to(torch.bfloat16)
        chunks.append(chunk)
    return chunks


def parallelize_chunk(chunk: MoETransformer, mesh: FoldedMesh, *, dispatcher: str,
                      attention_backend: str) -> None:
    config = mesh.config
    if config.world_size > 1 and chunk.moe_layers():
        from engine.moe.parallelize import parallelize_moe
        parallelize_moe(chunk, mesh, dispatcher=dispatcher)
    chunk.tp_comm = None   # byte counter shared by this chunk's TP regions and its loss
    if config.tp > 1:
        from engine.tensor_parallel.plan import parallelize_tp
        chunk.tp_comm = parallelize_tp(chunk, mesh)
    _install_attention_cores(chunk, mesh, attention_backend)
    _tag_tied_embedding(chunk, mesh)


def _install_attention_cores(chunk: MoETransformer, mesh: FoldedMesh, backend: str) -> None:
    """Ring / all-to-all / hybrid CP core at cp > 1, the local block core otherwise. Both save
    (q, k, v, out, lse), so no recompute mode ever re-runs the attention forward."""
    from engine.context_parallel import build_cp_attention
    for block in chunk.layers.values():
        block.attention.core = build_cp_attention(mesh, backend=backend)


def _tag_tied_embedding(chunk: MoETransformer, mesh: FoldedMesh) -> None:
    """With tied embeddings and PP, the first and last stage each hold the table; their
    gradients are summed over the embedding group so both copies stay identical."""
    if chunk.cfg.tie_embeddings and mesh.config.pp > 1 and chunk.embed is not None:
        weight = chunk.embed.weight
        set_reduce_axes(weight, tuple(reduce_axes(weight)) + ("embed",))


def named_parameters(chunks: list[nn.Module]) -> list[tuple[str, nn.Parameter]]:
    """Parameters of all chunks; names are global so they never collide."""
    out, seen = [], set()
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            if name in seen:
                raise ValueError(f"parameter name {name!r} appears in two pipeline chunks")
            seen.add(name)
            out.append((name, param))
    return out

"""A toy model whose params carry every gradient tag the optimizer must handle, plus a
single-process reference: AdamW on the global params with the summed gradient.

Params (global shapes; each rank holds the slice its layout gives it):
  dense.weight [4, H], dense.bias [4]  replicated everywhere, reduce over dp_cp
  norm.weight [H]                      sequence-parallel: reduce over dp_cp (and tp)
  col.weight [3 * tp, H]               TP-sharded along dim 0, reduce over dp_cp
  expert.weight [2 * ep, H]            expert sharded along dim 0 over ep, reduce over edp
Data: per step every data shard (dp_cp index) has SEQS sequences of TOKENS tokens, shared by
its TP ranks (sequence-parallel terms split the tokens over tp); expert tokens are per
global rank, as after a dispatch. Micro-batches split the sequences.
"""
from __future__ import annotations

import torch
from torch import nn

from engine.optim import lr_at, uses_weight_decay
from engine.parallel.config import ParallelConfig
from engine.parallel.mesh import FoldedMesh
from engine.parallel.param_attrs import mark_expert, mark_tp_sharded, reduce_axes, set_reduce_axes
from engine.parallel.ranks import RankLayout

H, SEQS, TOKENS, EXPERT_TOKENS = 6, 4, 4, 3
NAMES = ("dense.weight", "dense.bias", "norm.weight", "col.weight", "expert.weight")


def global_shapes(pcfg: ParallelConfig) -> dict[str, tuple[int, ...]]:
    return {"dense.weight": (4, H), "dense.bias": (4,), "norm.weight": (H,),
            "col.weight": (3 * pcfg.tp, H), "expert.weight": (2 * pcfg.ep, H)}


def init_global(pcfg: ParallelConfig) -> dict[str, torch.Tensor]:
    out = {}
    for i, (name, shape) in enumerate(global_shapes(pcfg).items()):
        gen = torch.Generator().manual_seed(100 + i)
        value = 0.5 * torch.randn(shape, generator=gen)
        out[name] = value + 1.0 if name == "norm.weight" else value
    return out


def local_slices(mesh: FoldedMesh) -> dict[str, slice]:
    tp_rank, ep_rank = mesh.rank_in("tp"), mesh.rank_in("ep")
    full = slice(None)
    return {"dense.weight": full, "dense.bias": full, "norm.weight": full,
            "col.weight": slice(3 * tp_rank, 3 * tp_rank + 3),
            "expert.weight": slice(2 * ep_rank, 2 * ep_rank + 2)}


class ToyModel(nn.Module):
    def __init__(self, mesh: FoldedMesh, global_params: dict[str, torch.Tensor]):
        super().__init__()
        self.mesh = mesh
        self.dense = nn.Linear(H, 4)
        self.norm = nn.Module()
        self.norm.weight = nn.Parameter(torch.empty(H))
        self.col = nn.Linear(H, 3, bias=False)
        self.expert = nn.Linear(H, 2, bias=False)
        params = dict(self.named_parameters())
        with torch.no_grad():
            for name, part in local_slices(mesh).items():
                params[name].copy_(global_params[name][part])
        if mesh.config.tp > 1:
            set_reduce_axes(self.norm.weight, ("dp_cp", "tp"))
        mark_tp_sharded(self.col.weight, 0)
        mark_expert(self.expert.weight)

    def loss(self, x_bth: torch.Tensor, xe_bth: torch.Tensor, with_col: bool = True) -> torch.Tensor:
        dtype = self.dense.weight.dtype
        x_bth, xe_bth = x_bth.to(dtype), xe_bth.to(dtype)
        tp, tp_rank = self.mesh.config.tp, self.mesh.rank_in("tp")
        dense = torch.tanh(self.dense(x_bth)).square().sum()          # same on TP ranks
        col = torch.sin(x_bth @ self.col.weight.T).sum() if with_col else 0.0   # this TP slice
        x_sp = x_bth.chunk(tp, dim=1)[tp_rank]                         # this rank's tokens
        sp = torch.tanh(x_sp * self.norm.weight).sum()
        expert = torch.sigmoid(xe_bth @ self.expert.weight.T).square().sum()
        return (dense + col + sp + expert).float() / 16


def step_data(mesh: FoldedMesh, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    shard = torch.Generator().manual_seed(1000 * step + mesh.rank_in("dp_cp"))
    own = torch.Generator().manual_seed(50_000 + 1000 * step + mesh.rank)
    return (torch.randn(SEQS, TOKENS, H, generator=shard),
            torch.randn(SEQS, EXPERT_TOKENS, H, generator=own))


def run_backward(model: ToyModel, step: int, num_microbatches: int, skip_col: bool = False) -> None:
    """skip_col: odd ranks leave col.weight out of their first micro-batch, so its hook
    fires one time fewer there (like an expert that receives no tokens)."""
    x, xe = step_data(model.mesh, step)
    for m, (xm, xem) in enumerate(zip(x.chunk(num_microbatches), xe.chunk(num_microbatches))):
        with_col = not (skip_col and m == 0 and model.mesh.rank % 2)
        model.loss(xm, xem, with_col).backward()


# ---- single-process reference ------------------------------------------------------------
def _reduced_local_grads(pcfg: ParallelConfig, global_params, step: int, micro: int):
    """Per rank: {name: gradient summed over the reduce axes, axis by axis like the optimizer}."""
    meshes = [FoldedMesh(pcfg, rank=r, create_groups=False) for r in range(pcfg.world_size)]
    grads, axes = [], {}
    for mesh in meshes:
        model = ToyModel(mesh, global_params)
        run_backward(model, step, micro)
        grads.append({n: p.grad for n, p in model.named_parameters()})
        axes = {n: reduce_axes(p) for n, p in model.named_parameters()}
    layout = RankLayout(pcfg)
    for name in NAMES:
        for axis in axes[name]:
            summed = [sum(grads[q][name] for q in layout.group_of(axis, r)) for r in range(pcfg.world_size)]
            for r in range(pcfg.world_size):
                grads[r][name] = summed[r]
    return meshes, grads


def reference_run(pcfg: ParallelConfig, tcfg, micro: int) -> tuple[dict, list[float]]:
    """Global params after tcfg.steps steps and the pre-clip grad norm of every step."""
    params = {n: t.clone().requires_grad_(True) for n, t in init_global(pcfg).items()}
    decay = [t for n, t in params.items() if uses_weight_decay(n, t)]
    no_decay = [t for n, t in params.items() if not uses_weight_decay(n, t)]
    opt = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2), eps=tcfg.eps,
                            weight_decay=tcfg.weight_decay)
    norms = []
    for step in range(tcfg.steps):
        detached = {n: t.detach() for n, t in params.items()}
        meshes, grads = _reduced_local_grads(pcfg, detached, step, micro)
        for name, tensor in params.items():
            tensor.grad = torch.zeros_like(tensor)
            for mesh, rank_grads in zip(meshes, grads):
                tensor.grad[local_slices(mesh)[name]] = rank_grads[name]
        norm = torch.nn.utils.get_total_norm([t.grad for t in params.values()])
        norms.append(float(norm))
        if tcfg.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(list(params.values()), tcfg.grad_clip, norm)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tcfg)
        opt.step()
    return {n: t.detach() for n, t in params.items()}, norms

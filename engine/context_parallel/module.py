"""Context-parallel attention cores: ring, Ulysses all-to-all (a2a) and hybrid.

Inputs are this rank's zigzag-local tokens (zigzag_shard of the sequence over the CP group):
q [b, s/cp, n_q, d], k/v [b, s/cp, n_kv, d] with RoPE applied; the output has q's shape.
- ring: K/V ride a ring over the whole CP group (RingAttentionFunction);
- a2a: one all-to-all to full sequence / n_q/cp heads, local attention, all-to-all back;
- hybrid: all-to-all inside sub-groups of size a2a_size, ring across the sub-groups.
"""
from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist

from engine.attention.core import CountedAttention, LocalAttention, LocalAttentionFunction, default_scale
from engine.parallel.axes import Axis
from engine.parallel.config import CP_MODES
from engine.parallel.traffic import Link, Traffic

from .groups import CpSubGroups
from .ring import RingAttentionFunction, RingSpec
from .ulysses import AllToAllSpec, gather_heads, scatter_heads



def _check_a2a_size(mode: str, a2a_size: int, cp: int) -> None:
    allowed = {"ring": a2a_size == 1, "a2a": a2a_size in (1, cp),
               "hybrid": a2a_size >= 2 and cp % a2a_size == 0}
    if not allowed[mode]:
        raise ValueError(f"context parallel mode {mode!r}: a2a_size={a2a_size} does not fit cp={cp} "
                         "(ring: 1; a2a: cp; hybrid: >= 2 and dividing cp)")


def _create_sub_groups(cp_ranks, all_cp_ranks, a2a_size, timeout) -> CpSubGroups:
    if all_cp_ranks is None:
        if dist.get_world_size() != len(cp_ranks):
            # Group creation is collective: other CP groups would create different groups and hang.
            raise ValueError("hybrid mode with several CP groups: pass all_cp_ranks or sub_groups")
        all_cp_ranks = [list(cp_ranks)]
    return CpSubGroups.create(all_cp_ranks, a2a_size, timeout=timeout)


class ContextParallelAttention(CountedAttention):
    """forward(q_bsnd, k_bsnd, v_bsnd) -> out_bsnd over zigzag-local tokens of one CP group.

    For hybrid, pass `sub_groups` (shared by all layers) or `all_cp_ranks` (every CP group of the
    world, so the sub-groups can be created collectively); by default cp_ranks is the only one.
    Bytes are counted into `traffic` (the mesh's) on cp, or on cp_a2a / cp_ring in hybrid mode.
    """

    def __init__(self, cp_group, cp_ranks: list[int], mode: str = "ring", a2a_size: int = 1,
                 backend: str = "auto", *, causal: bool = True, scale: float | None = None,
                 sub_groups: CpSubGroups | None = None, all_cp_ranks: list[list[int]] | None = None,
                 timeout: timedelta | None = None, traffic: Traffic | None = None):
        super().__init__()
        self.traffic = traffic if traffic is not None else Traffic()
        if mode not in CP_MODES:
            raise ValueError(f"context parallel mode {mode!r}: expected one of {CP_MODES}")
        self.cp_size = len(cp_ranks)
        self.mode, self.backend, self.causal, self.scale = mode, backend, causal, scale
        _check_a2a_size(mode, a2a_size, self.cp_size)
        if mode == "ring":
            self._set_axes(None, [], cp_group, list(cp_ranks))
        elif mode == "a2a":
            self._set_axes(cp_group, list(cp_ranks), None, [dist.get_rank()])
        else:
            groups = sub_groups or _create_sub_groups(cp_ranks, all_cp_ranks, a2a_size, timeout)
            self._set_axes(groups.a2a_group, groups.a2a_ranks, groups.ring_group, groups.ring_ranks,
                           a2a_axis=Axis.CP_A2A, ring_axis=Axis.CP_RING)

    def _set_axes(self, a2a_group, a2a_ranks, ring_group, ring_ranks, *,
                  a2a_axis: Axis = Axis.CP, ring_axis: Axis = Axis.CP) -> None:
        rank = dist.get_rank()
        self.a2a = (AllToAllSpec(a2a_group, len(a2a_ranks), Link(self.traffic, a2a_axis),
                                 reorder=self.causal)
                    if len(a2a_ranks) > 1 else None)
        self.ring_link = Link(self.traffic, ring_axis)
        self.ring_group, self.ring_ranks = ring_group, ring_ranks
        self.ring_position = ring_ranks.index(rank)

    def _check_inputs(self, q_bsnd, k_bsnd, v_bsnd) -> None:
        s_local = q_bsnd.shape[1]
        if k_bsnd.shape[1] != s_local or v_bsnd.shape[1] != s_local:
            raise ValueError(f"context parallel: q/k/v local lengths differ: {q_bsnd.shape[1]}, "
                             f"{k_bsnd.shape[1]}, {v_bsnd.shape[1]}")
        if self.causal and s_local % 2:
            raise ValueError(f"context parallel: local length {s_local} is odd; zigzag sharding needs "
                             f"the sequence length divisible by 2*cp = {2 * self.cp_size}")

    def forward(self, q_bsnd, k_bsnd, v_bsnd):
        self._check_inputs(q_bsnd, k_bsnd, v_bsnd)
        scale = default_scale(q_bsnd, self.scale)
        if self.a2a is not None:
            q_bsnd, k_bsnd, v_bsnd = scatter_heads(q_bsnd, k_bsnd, v_bsnd, self.a2a)
        if len(self.ring_ranks) == 1:
            out_bsnd = LocalAttentionFunction.apply(q_bsnd, k_bsnd, v_bsnd, self.causal, scale,
                                                    self.backend, self.counters)
        else:
            spec = RingSpec(self.ring_group, self.ring_ranks, self.ring_position, self.causal, scale,
                            self.backend, self.counters, self.ring_link)
            out_bsnd = RingAttentionFunction.apply(q_bsnd, k_bsnd, v_bsnd, spec)
        return out_bsnd if self.a2a is None else gather_heads(out_bsnd, self.a2a)

    def extra_repr(self) -> str:
        return (f"mode={self.mode}, cp={self.cp_size}, a2a={self.a2a.size if self.a2a else 1}, "
                f"ring={len(self.ring_ranks)}, backend={self.backend}, causal={self.causal}")


def build_cp_attention(mesh, mode: str | None = None, a2a_size: int | None = None, backend: str = "auto",
                       *, causal: bool = True, sub_groups: CpSubGroups | None = None,
                       timeout: timedelta | None = None):
    """The attention core for `mesh` (a FoldedMesh): LocalAttention when cp == 1.

    mode and a2a_size default to mesh.config.cp_mode / cp_a2a_size. Hybrid creates its sub-groups
    collectively unless `sub_groups` (CpSubGroups.create(mesh.layout.groups("cp"), ...)) is given;
    pass one shared instance when building a core per layer.
    """
    mode = mesh.config.cp_mode if mode is None else mode
    a2a_size = mesh.config.cp_a2a_size if a2a_size is None else a2a_size
    if mesh.size("cp") == 1:
        return LocalAttention(backend, causal=causal)
    if mode == "hybrid" and sub_groups is None:
        if mode == mesh.config.cp_mode and a2a_size == mesh.config.cp_a2a_size:
            sub_groups = CpSubGroups.from_mesh(mesh)
        else:   # a mode other than the mesh's: create the sub-groups (collective)
            sub_groups = CpSubGroups.create(mesh.layout.groups("cp"), a2a_size, rank=mesh.rank,
                                            timeout=timeout)
    a2a_size = {"ring": 1, "a2a": mesh.size("cp")}.get(mode, a2a_size)
    return ContextParallelAttention(mesh.group("cp"), mesh.ranks("cp"), mode, a2a_size, backend,
                                    causal=causal, sub_groups=sub_groups, traffic=mesh.traffic)

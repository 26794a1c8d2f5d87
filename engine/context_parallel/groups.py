"""Process groups of hybrid context parallelism: Ulysses inside sub-groups, ring across them.

A CP group [c_0 .. c_{cp-1}] is cut into a2a sub-groups of consecutive members
[c_{g*P} .. c_{g*P+P-1}] and ring groups of the members at the same position in every sub-group
[c_i, c_{i+P}, ...]. With zigzag sharding, a2a sub-group g then holds super-chunks g and 2R-1-g of
a zigzag over R = cp/P, so the ring across sub-groups is an ordinary zigzag ring of size R.

Creating groups is collective over the whole world: every rank creates every group of every CP
group, in the same order. Build one CpSubGroups per model and share it between layers.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from engine.parallel.ranks import split_cp_group


@dataclass
class CpSubGroups:
    a2a_group: object
    a2a_ranks: list[int]
    ring_group: object
    ring_ranks: list[int]

    @classmethod
    def create(cls, all_cp_ranks: list[list[int]], a2a_size: int, rank: int | None = None,
               timeout: timedelta | None = None) -> "CpSubGroups":
        """all_cp_ranks: every CP group of the world (e.g. RankLayout.groups("cp"))."""
        rank = dist.get_rank() if rank is None else rank
        a2a_lists, ring_lists = [], []
        for cp_ranks in all_cp_ranks:
            a2a, ring = split_cp_group(list(cp_ranks), a2a_size)
            a2a_lists += a2a
            ring_lists += ring
        a2a_group, _ = dist.new_subgroups_by_enumeration(a2a_lists, timeout=timeout)
        ring_group, _ = dist.new_subgroups_by_enumeration(ring_lists, timeout=timeout)
        a2a_ranks = next(r for r in a2a_lists if rank in r)
        ring_ranks = next(r for r in ring_lists if rank in r)
        return cls(a2a_group, a2a_ranks, ring_group, ring_ranks)

    @classmethod
    def from_mesh(cls, mesh) -> "CpSubGroups":
        """The hybrid sub-groups the FoldedMesh already owns (axes cp_a2a and cp_ring)."""
        return cls(mesh.group("cp_a2a"), mesh.ranks("cp_a2a"), mesh.group("cp_ring"), mesh.ranks("cp_ring"))

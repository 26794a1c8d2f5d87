"""FoldedMesh: the one object that owns the torch.distributed groups of a run.

It is built from a ParallelConfig and passed explicitly to whatever communicates;
nothing in foldmoe keeps process groups in module globals.
"""
from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist

from .axes import Axis, SubAxis
from .config import ParallelConfig
from .ranks import AXES, EXTRA_AXES, RankLayout
from .traffic import Traffic

ALL_AXES = tuple(AXES) + EXTRA_AXES


class FoldedMesh:
    """Process groups for every axis of the attention and MoE meshes.

    `group(axis)` is this rank's group on that axis; axes: tp, cp, dp, pp, dp_cp,
    tp_cp, stage, etp, ep, edp, etp_ep, embed, cp_a2a and cp_ring (hybrid CP). Groups with identical rank lists are
    created once and shared. `traffic` is the byte counter every module that communicates
    over these groups reports into (engine/parallel/traffic.py).
    """

    def __init__(self, config: ParallelConfig, rank: int | None = None, *,
                 timeout: timedelta | None = None, create_groups: bool = True):
        self.config = config
        self.layout = RankLayout(config)
        self.layout.check_pp_identical()
        self.rank = dist.get_rank() if rank is None else rank
        self._groups: dict[str, object] = {}
        self._ranks: dict[str, list[int]] = {}
        self._subgroups: dict[tuple[str, int], tuple[object, list[int]]] = {}
        self._timeout = timeout
        self.traffic = Traffic()
        if create_groups:
            if dist.get_world_size() != config.world_size:
                raise ValueError(
                    f"process group world size {dist.get_world_size()} != "
                    f"ParallelConfig.world_size {config.world_size}")
            self._create_groups(timeout)
        else:
            for axis in ALL_AXES:
                self._ranks[axis] = self.layout.group_of(axis, self.rank)

    def _create_groups(self, timeout: timedelta | None) -> None:
        # Every rank must create every group in the same order; identical lists share one group.
        by_ranks: dict[tuple[int, ...], object] = {}
        for axis in ALL_AXES:
            for ranks in self.layout.groups(axis):
                key = tuple(ranks)
                if key not in by_ranks:
                    kwargs = {"timeout": timeout} if timeout is not None else {}
                    by_ranks[key] = dist.new_group(ranks=list(ranks), **kwargs)
                if self.rank in ranks:
                    self._groups[axis] = by_ranks[key]
                    self._ranks[axis] = list(ranks)

    def subgroup(self, axis: Axis, size: int) -> tuple[object, list[int]]:
        """(group, ranks) of this rank's run of `size` consecutive ranks of its `axis` group.

        Created on first use and cached. Creation is collective: every rank must ask for the
        same (axis, size) in the same order (parallel plans are applied on every rank alike)."""
        key = (axis, size)
        if key not in self._subgroups:
            kwargs = {"timeout": self._timeout} if self._timeout is not None else {}
            for ranks in self.layout.sub_groups(axis, size):
                group = dist.new_group(ranks=ranks, **kwargs)
                if self.rank in ranks:
                    self._subgroups[key] = (group, ranks)
        return self._subgroups[key]

    def group(self, axis: Axis):
        if axis not in self._groups:
            raise KeyError(f"no process group for axis {axis!r} (created: {bool(self._groups)})")
        return self._groups[axis]

    def ranks(self, axis: Axis) -> list[int]:
        return self._ranks[axis]

    def size(self, axis: Axis | SubAxis) -> int:
        return axis.size if isinstance(axis, SubAxis) else len(self._ranks[axis])

    def rank_in(self, axis: Axis | SubAxis) -> int:
        """Position of this rank in its group of `axis` (in its run, for a SubAxis)."""
        if isinstance(axis, SubAxis):
            return self.rank_in(axis.axis) % axis.size
        return self._ranks[axis].index(self.rank)

    @property
    def pp_rank(self) -> int:
        return self.rank_in("pp")

    @property
    def is_first_stage(self) -> bool:
        return self.rank_in("pp") == 0

    @property
    def is_last_stage(self) -> bool:
        return self.rank_in("pp") == self.config.pp - 1

    def __repr__(self) -> str:
        c = self.config
        return (f"FoldedMesh(rank={self.rank}, world={c.world_size}, tp={c.tp}, cp={c.cp}, "
                f"dp={c.dp}, pp={c.pp}, etp={c.etp}, ep={c.ep}, edp={c.edp})")

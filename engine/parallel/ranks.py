"""Pure rank arithmetic of the folded mesh: no process group is needed.

Two generators walk the same ranks (Megatron-Core parallel_state, arXiv 2504.14960):
attention axes in order tp-cp-dp-pp and MoE axes in order etp-ep-edp-pp, the first axis
having stride 1. PP is last in both, so both give the same PP groups.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from itertools import product

from .axes import Axis
from .config import ParallelConfig

ATTENTION_ORDER = ("tp", "cp", "dp", "pp")
MOE_ORDER = ("etp", "ep", "edp", "pp")

# axis name -> (which generator, which of its axes vary inside one group)
AXES: dict[Axis, tuple[str, tuple[str, ...]]] = {
    Axis.TP: ("attention", ("tp",)),
    Axis.CP: ("attention", ("cp",)),
    Axis.DP: ("attention", ("dp",)),
    Axis.PP: ("attention", ("pp",)),
    Axis.DP_CP: ("attention", ("cp", "dp")),      # dense gradient reduction
    Axis.TP_CP: ("attention", ("tp", "cp")),      # ranks sharing one sequence
    Axis.STAGE: ("attention", ("tp", "cp", "dp")),  # all ranks of one pipeline stage
    Axis.ETP: ("moe", ("etp",)),
    Axis.EP: ("moe", ("ep",)),
    Axis.EDP: ("moe", ("edp",)),                  # expert gradient reduction
    Axis.ETP_EP: ("moe", ("etp", "ep")),          # token dispatcher group
}


EXTRA_AXES = (Axis.EMBED, Axis.CP_A2A, Axis.CP_RING)


def split_cp_group(cp_ranks: list[int], a2a_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """Hybrid CP: (all-to-all sub-groups of consecutive members, ring groups of the members at
    the same position in every sub-group) of one CP group, as global ranks."""
    cp = len(cp_ranks)
    if a2a_size < 1 or cp % a2a_size:
        raise ValueError(f"hybrid CP: a2a size {a2a_size} does not divide cp={cp}")
    a2a_groups = [list(cp_ranks[g * a2a_size:(g + 1) * a2a_size]) for g in range(cp // a2a_size)]
    ring_groups = [list(cp_ranks[i::a2a_size]) for i in range(a2a_size)]
    return a2a_groups, ring_groups


def _groups(order: tuple[str, ...], sizes: dict[str, int], varying: tuple[str, ...]) -> list[list[int]]:
    """Rank lists in which the `varying` axes change and all other axes are fixed."""
    strides, stride = {}, 1
    for axis in order:
        strides[axis] = stride
        stride *= sizes[axis]
    fixed = [a for a in order if a not in varying]
    moving = [a for a in order if a in varying]
    groups = []
    for fixed_idx in product(*(range(sizes[a]) for a in reversed(fixed))):
        base = sum(i * strides[a] for a, i in zip(reversed(fixed), fixed_idx))
        ranks = []
        for moving_idx in product(*(range(sizes[a]) for a in reversed(moving))):
            ranks.append(base + sum(i * strides[a] for a, i in zip(reversed(moving), moving_idx)))
        groups.append(sorted(ranks))
    return sorted(groups)


@dataclass(frozen=True)
class RankLayout:
    """Every group of every axis, as lists of global ranks."""

    config: ParallelConfig

    @cached_property
    def _sizes(self) -> dict[str, dict[str, int]]:
        c = self.config
        return {
            "attention": {"tp": c.tp, "cp": c.cp, "dp": c.dp, "pp": c.pp},
            "moe": {"etp": c.etp, "ep": c.ep, "edp": c.edp, "pp": c.pp},
        }

    def groups(self, axis: str) -> list[list[int]]:
        if axis == "embed":
            return self._embedding_groups()
        if axis in ("cp_a2a", "cp_ring"):
            return self._hybrid_cp_groups(axis)
        if axis not in AXES:
            raise KeyError(f"unknown mesh axis {axis!r}; known: {sorted(AXES) + list(EXTRA_AXES)}")
        generator, varying = AXES[axis]
        order = ATTENTION_ORDER if generator == "attention" else MOE_ORDER
        return _groups(order, self._sizes[generator], varying)

    def _embedding_groups(self) -> list[list[int]]:
        """First and last pipeline stage of each PP group (tied embeddings)."""
        return [sorted({g[0], g[-1]}) for g in self.groups("pp")]

    def _hybrid_cp_groups(self, axis: str) -> list[list[int]]:
        """Sub-groups of hybrid CP (singletons / the CP group itself in other modes)."""
        a2a = self.config.cp_a2a_size if self.config.cp_mode == "hybrid" else 1
        out = []
        for cp_ranks in self.groups("cp"):
            a2a_groups, ring_groups = split_cp_group(cp_ranks, a2a)
            out += a2a_groups if axis == "cp_a2a" else ring_groups
        return sorted(out)

    def sub_groups(self, axis: str, size: int) -> list[list[int]]:
        """Every group of `axis` cut into consecutive runs of `size` ranks (e.g. the TP ranks
        that share one replicated kv head)."""
        out = []
        for group in self.groups(axis):
            if len(group) % size:
                raise ValueError(f"{axis} group of {len(group)} ranks cannot be cut into runs of {size}")
            out += [group[i:i + size] for i in range(0, len(group), size)]
        return out

    def group_of(self, axis: str, rank: int) -> list[int]:
        for group in self.groups(axis):
            if rank in group:
                return group
        raise ValueError(f"rank {rank} is in no {axis} group (world size {self.config.world_size})")

    def coords(self, rank: int) -> dict[str, int]:
        """This rank's index along every axis of both generators."""
        out = {}
        for axis in ("tp", "cp", "dp", "pp", "etp", "ep", "edp", "dp_cp", "tp_cp", "etp_ep", "stage"):
            out[axis] = self.group_of(axis, rank).index(rank)
        return out

    def check_pp_identical(self) -> None:
        moe_pp = _groups(MOE_ORDER, self._sizes["moe"], ("pp",))
        if moe_pp != self.groups("pp"):
            raise AssertionError(f"PP groups differ: attention {self.groups('pp')} vs MoE {moe_pp}")

    def table(self) -> dict[str, list[list[int]]]:
        names = ("tp", "cp", "dp", "pp", "dp_cp", "tp_cp", "etp", "ep", "edp", "etp_ep")
        return {name: self.groups(name) for name in names}

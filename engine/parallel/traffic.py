"""Bytes this rank sends, per mesh axis: the one counter every communicating module
(TP regions, CP cores, dispatchers, pipeline p2p, the optimizer) reports into.

The mesh owns one `Traffic`; a module is handed it together with the axis its group lies
on. Volumes are what one rank puts on the wire with ring algorithms, B = bytes of the full
buffer and n = group size: all-reduce 2(n-1)/n B; all-gather and reduce-scatter (n-1)/n B
each (so reduce-scatter + all-gather costs one all-reduce, the ZeRO-1 trade of
arXiv 1910.02054); point-to-point and all-to-all count what leaves the rank.
"""
from __future__ import annotations

from dataclasses import dataclass

from .axes import Axis, SubAxis

# Which per-step metric (comm_bytes_<kind>) the bytes of an axis are reported under.
AXIS_KIND = {Axis.TP: "tp", Axis.TP_CP: "tp", Axis.CP: "cp", Axis.CP_A2A: "cp", Axis.CP_RING: "cp",
             Axis.DP: "dp", Axis.DP_CP: "dp", Axis.EDP: "dp", Axis.STAGE: "dp",
             Axis.EP: "ep", Axis.ETP: "ep", Axis.ETP_EP: "ep", Axis.PP: "pp", Axis.EMBED: "pp"}
KINDS = ("dp", "ep", "tp", "cp", "pp")


def ring_gather_fraction(n: int) -> float:
    """Share of a full buffer one rank sends in a ring all-gather or reduce-scatter, (n-1)/n
    (an all-reduce sends twice that); the planner's volumes use it too."""
    return (n - 1) / n if n > 1 else 0.0


def ring_all_reduce_bytes(nbytes: int, n: int) -> int:
    return 2 * (n - 1) * nbytes // n       # 2 * ring_gather_fraction(n), in whole bytes


def ring_gather_bytes(nbytes: int, n: int) -> int:
    """All-gather or reduce-scatter of a full buffer of `nbytes`."""
    return (n - 1) * nbytes // n           # ring_gather_fraction(n), in whole bytes


class Traffic:
    """Cumulative bytes sent by this rank, forward and backward, keyed by axis."""

    def __init__(self) -> None:
        self._bytes: dict[Axis, int] = {}

    def add(self, axis: Axis | SubAxis, nbytes: int) -> None:
        key = axis.axis if isinstance(axis, SubAxis) else Axis(axis)
        self._bytes[key] = self._bytes.get(key, 0) + int(nbytes)

    def get(self, axis: Axis) -> int:
        return self._bytes.get(Axis(axis), 0)

    def snapshot(self) -> dict[Axis, int]:
        return dict(self._bytes)

    def since(self, snapshot: dict[Axis, int]) -> dict[Axis, int]:
        return {axis: n - snapshot.get(axis, 0) for axis, n in self._bytes.items()
                if n != snapshot.get(axis, 0)}

    def total(self) -> int:
        return sum(self._bytes.values())


@dataclass(frozen=True)
class Link:
    """Where one communicating piece counts its bytes: the mesh's Traffic, on one axis."""

    traffic: Traffic
    axis: Axis | SubAxis

    def add(self, nbytes: int) -> None:
        self.traffic.add(self.axis, nbytes)


def by_kind(per_axis: dict[Axis, int]) -> dict[str, float]:
    """{"comm_bytes_dp": .., "comm_bytes_ep": .., ...}: every kind present, zero if idle."""
    out = {f"comm_bytes_{kind}": 0.0 for kind in KINDS}
    for axis, n in per_axis.items():
        out[f"comm_bytes_{AXIS_KIND[axis]}"] += float(n)
    return out

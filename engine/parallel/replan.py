"""Re-planning the layout for a new world size (elastic restarts): a pure function.

Rule (issue 12, "Re-plan"):
1. The configured layout is kept when it is valid at the new world size.
2. Otherwise each degree may shrink to a divisor of its configured value (a degree never
   grows, and a shrunk degree still divides what the user sized the model for); among the
   valid candidates the one with the largest degrees wins, compared in the fixed priority
   pp, tp, cp, etp, ep: pp first because it decides which layers a rank holds and both
   generators share it (arXiv 2504.14960), then the attention side, then the MoE side.
   DP and EDP absorb the rest of the world (world / (tp*cp*pp), world / (etp*ep*pp)).
3. vpp is kept while pp > 1 (it only reorders chunks), and is 1 when pp shrinks to 1;
   sequence_parallel, cp_mode and cp_a2a_size are kept as configured.
"valid" is ParallelConfig's own validation plus `check`, which the caller passes for what
the mesh cannot know (model shape, batch divisibility, pipeline schedule); it raises
ValueError for a layout it refuses. Global batch, micro-batch size and data order are not
part of the layout: gradient accumulation absorbs the change of dp.
"""
from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Callable

from .config import LayoutError, ParallelConfig

PRIORITY = ("pp", "tp", "cp", "etp", "ep")


def _divisors(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def _candidate(configured: ParallelConfig, world_size: int, degrees: dict) -> ParallelConfig | None:
    vpp = configured.vpp if degrees["pp"] > 1 else 1
    try:
        return replace(configured, world_size=world_size, vpp=vpp, **degrees)
    except LayoutError:
        return None


def replan(configured: ParallelConfig, world_size: int,
           check: Callable[[ParallelConfig], None] | None = None) -> ParallelConfig:
    """The layout for `world_size` by the rule above; LayoutError when none is valid."""
    options = [_divisors(getattr(configured, axis)) for axis in PRIORITY]
    first_refusal = None
    # itertools.product of descending lists enumerates in lexicographic descending order,
    # so the first valid candidate is the one the priority prefers.
    for values in itertools.product(*options):
        candidate = _candidate(configured, world_size, dict(zip(PRIORITY, values)))
        if candidate is None:
            continue
        try:
            if check is not None:
                check(candidate)
        except ValueError as err:
            first_refusal = first_refusal or f"{describe(candidate)}: {err}"
            continue
        return candidate
    raise LayoutError(f"parallel: no layout for world size {world_size} keeps degrees that "
                      f"divide the configured tp={configured.tp} cp={configured.cp} "
                      f"pp={configured.pp} ep={configured.ep} etp={configured.etp}"
                      + (f" (the preferred one, {first_refusal})" if first_refusal else ""))


def describe(config: ParallelConfig) -> str:
    """'tp2 cp1 pp2 (vpp1) ep4 etp1 -> dp2 edp1' for logs and `foldmoe validate`."""
    return (f"tp{config.tp} cp{config.cp} pp{config.pp} (vpp{config.vpp}) ep{config.ep} "
            f"etp{config.etp} -> dp{config.dp} edp{config.edp}")

"""ParallelConfig: the sizes of the folded mesh and their validation.

Attention layers run on TP x CP x DP x PP, MoE layers on ETP x EP x EDP x PP over the
same ranks (MoE Parallel Folding, arXiv 2504.14960). DP and EDP are derived from the
world size; everything else is chosen by the user.
"""
from __future__ import annotations

from dataclasses import dataclass

CP_MODES = ("ring", "a2a", "hybrid")


class LayoutError(ValueError):
    """An impossible parallel layout; the message names the offending key and value."""


@dataclass(frozen=True)
class ParallelConfig:
    world_size: int
    tp: int = 1
    cp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1
    vpp: int = 1
    sequence_parallel: bool = True
    cp_mode: str = "ring"
    cp_a2a_size: int = 1

    def __post_init__(self) -> None:
        for key in ("world_size", "tp", "cp", "pp", "ep", "etp", "vpp", "cp_a2a_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LayoutError(f"parallel.{key}={value!r}: must be a positive integer")
        attn = self.tp * self.cp * self.pp
        if self.world_size % attn:
            raise LayoutError(
                f"parallel: world size {self.world_size} is not divisible by "
                f"tp*cp*pp = {self.tp}*{self.cp}*{self.pp} = {attn}")
        moe = self.etp * self.ep * self.pp
        if self.world_size % moe:
            raise LayoutError(
                f"parallel: world size {self.world_size} is not divisible by "
                f"etp*ep*pp = {self.etp}*{self.ep}*{self.pp} = {moe}")
        if self.tp > 1 and not self.sequence_parallel:
            raise LayoutError(
                f"parallel.sequence_parallel=False with tp={self.tp}: MoE layers take the "
                "sequence-sharded tokens of each TP rank, so tp > 1 needs sequence parallelism")
        if self.cp_mode not in CP_MODES:
            raise LayoutError(f"parallel.cp_mode={self.cp_mode!r}: expected one of {CP_MODES}")
        if self.cp_mode == "hybrid" and (self.cp % self.cp_a2a_size or self.cp_a2a_size < 2):
            raise LayoutError(
                f"parallel.cp_a2a_size={self.cp_a2a_size}: hybrid mode needs a size >= 2 "
                f"that divides cp={self.cp}")

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.cp * self.pp)

    @property
    def edp(self) -> int:
        return self.world_size // (self.etp * self.ep * self.pp)

    @property
    def cp_a2a_group_size(self) -> int:
        """Ranks of each CP all-to-all group: 1 for the ring, cp for a2a, cp_a2a_size for hybrid."""
        if self.cp == 1:
            return 1
        return {"ring": 1, "a2a": self.cp}.get(self.cp_mode, self.cp_a2a_size)

    def validate_for_model(self, *, num_heads: int, num_kv_heads: int, num_experts: int,
                           num_layers: int, vocab_size: int | None = None) -> None:
        """Checks that need the model shape; raises LayoutError naming the key."""
        if num_experts % self.ep:
            raise LayoutError(
                f"parallel.ep={self.ep}: model.num_experts={num_experts} is not divisible by it")
        if num_heads % self.tp:
            raise LayoutError(
                f"parallel.tp={self.tp}: model.num_heads={num_heads} is not divisible by it")
        if num_kv_heads >= self.tp and num_kv_heads % self.tp:
            raise LayoutError(
                f"parallel.tp={self.tp}: model.num_kv_heads={num_kv_heads} is not divisible by it")
        if num_kv_heads < self.tp and self.tp % num_kv_heads:
            raise LayoutError(
                f"parallel.tp={self.tp}: must be a multiple of model.num_kv_heads={num_kv_heads} "
                "when kv heads are replicated")
        if num_layers < self.pp * self.vpp:
            raise LayoutError(
                f"parallel.pp={self.pp} x vpp={self.vpp}: more pipeline chunks than "
                f"model.num_layers={num_layers}")
        if self.cp_mode in ("a2a", "hybrid"):
            a2a = self.cp if self.cp_mode == "a2a" else self.cp_a2a_size
            if (num_heads // self.tp) % a2a:
                raise LayoutError(
                    f"parallel.cp_mode={self.cp_mode}: heads per TP rank ({num_heads // self.tp}) "
                    f"not divisible by the all-to-all size {a2a}")
        if vocab_size is not None and vocab_size % self.tp:
            raise LayoutError(
                f"parallel.tp={self.tp}: model.vocab_size={vocab_size} is not divisible by it")

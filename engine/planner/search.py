"""The folding planner's search: every valid folded layout of N GPUs, those that fit memory,
ranked by predicted step time.

A candidate is (tp, cp, pp, vpp, ep, etp) with dp = N/(tp·cp·pp) and edp = N/(etp·ep·pp),
valid by the same rules as `ParallelConfig` / `validate_for_model` / `TrainConfig` and
`foldmoe validate` (divisibility of heads, kv heads, experts, vocabulary, sequence shards,
global batch; interleaving needs m % pp == 0), times the micro-batch sizes and recompute
modes searched. For each layout and micro-batch size only the cheapest recompute mode that
fits is kept: recompute modes are ordered by the work they add (none < selective <
remat_aware < full) and, in this engine, by the memory they keep the other way round, so
a costlier mode that also fits is never faster. vpp is searched over the divisors of the
layers per stage (equal chunks, as Megatron requires).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from engine.config.model import ModelConfig
from engine.parallel.config import LayoutError, ParallelConfig
from engine.config.train import TrainConfig

from .cost import Machine, estimate_step
from .memory import layer_figures, peak_memory, rank_infos, rank_states

RECOMPUTE_ORDER = ("none", "selective", "remat_aware", "full")
DEGREE_KEYS = ("tp", "cp", "pp", "vpp", "ep", "etp", "dp", "edp")


@dataclass(frozen=True)
class SearchSpace:
    micro_batch_sizes: tuple[int, ...] = (1, 2, 4)
    recompute: tuple[str, ...] = RECOMPUTE_ORDER
    max_tp: int = 8              # TP stays inside one node
    max_cp: int = 8
    only: dict = field(default_factory=dict)   # key -> value a row must have (--only)


@dataclass(frozen=True)
class PlanRow:
    parallel: ParallelConfig
    micro_batch_size: int
    recompute: str
    step_time_s: float
    mfu: float
    tflops_per_gpu: float
    memory_bytes: int
    breakdown: dict

    def degrees(self) -> dict:
        return _degrees(self.parallel)

    def as_dict(self) -> dict:
        return {**self.degrees(), "cp_mode": self.parallel.cp_mode, "micro_batch_size": self.micro_batch_size,
                "recompute": self.recompute, "step_time_s": self.step_time_s, "mfu": self.mfu,
                "tflops_per_gpu": self.tflops_per_gpu, "memory_bytes": self.memory_bytes,
                "breakdown": dict(self.breakdown)}


@dataclass(frozen=True)
class PlanResult:
    searched: int          # candidates evaluated (layout x micro-batch x recompute)
    seconds: float         # wall clock of the search
    cpu_seconds: float     # CPU time of the search (one core; what a loaded machine cannot inflate)
    rows: list[PlanRow]    # feasible, fastest first


def _divisors(n: int, cap: int | None = None) -> list[int]:
    return [d for d in range(1, (cap or n) + 1) if n % d == 0]


def _powers_of_two(limit: int) -> list[int]:
    out, v = [], 1
    while v <= limit:
        out.append(v)
        v *= 2
    return out


def _tp_ok(cfg: ModelConfig, tp: int) -> bool:
    kv = cfg.num_kv_heads
    kv_ok = kv % tp == 0 if kv >= tp else tp % kv == 0
    return cfg.num_heads % tp == 0 and kv_ok and cfg.vocab_size % tp == 0


def candidate_layouts(cfg: ModelConfig, train: TrainConfig, world: int, space: SearchSpace,
                      options: dict | None = None):
    """Yields every valid ParallelConfig of `world` ranks; `options`: the non-degree fields
    (sequence_parallel, cp_mode, cp_a2a_size) every candidate keeps; a layout without CP
    takes the default flavour, since the CP flavour is moot there (hybrid's all-to-all size
    would otherwise rule out every cp = 1 layout)."""
    base_kwargs = dict(options or {})
    no_cp_kwargs = {k: v for k, v in base_kwargs.items() if k not in ("cp_mode", "cp_a2a_size")}
    moe = cfg.moe
    tps = [t for t in _powers_of_two(space.max_tp) if world % t == 0 and _tp_ok(cfg, t)]
    for tp in tps:
        for cp in (c for c in _powers_of_two(space.max_cp) if world % (tp * c) == 0):
            if train.seq_len % (tp * cp * (2 if cp > 1 else 1)):
                continue
            for pp in _divisors(world // (tp * cp), cfg.num_layers):
                dp = world // (tp * cp * pp)
                if train.global_batch_size % dp:
                    continue
                per_stage = cfg.num_layers // pp if cfg.num_layers % pp == 0 else 0
                vpps = [1] + ([v for v in _divisors(per_stage) if v > 1] if pp > 1 and per_stage else [])
                for ep in (e for e in _divisors(moe.num_experts) if world % (e * pp) == 0):
                    for etp in (t for t in _powers_of_two(8) if world % (t * ep * pp) == 0
                                and moe.ffn_hidden_size % t == 0):
                        for vpp in vpps:
                            try:
                                p = ParallelConfig(world_size=world, tp=tp, cp=cp, pp=pp, ep=ep, etp=etp,
                                                   vpp=vpp, **(base_kwargs if cp > 1 else no_cp_kwargs))
                                p.validate_for_model(num_heads=cfg.num_heads,
                                                     num_kv_heads=cfg.num_kv_heads,
                                                     num_experts=moe.num_experts,
                                                     num_layers=cfg.num_layers,
                                                     vocab_size=cfg.vocab_size)
                            except LayoutError:
                                continue
                            yield p


def _degrees(p: ParallelConfig) -> dict:
    return {"tp": p.tp, "cp": p.cp, "pp": p.pp, "vpp": p.vpp, "ep": p.ep, "etp": p.etp,
            "dp": p.dp, "edp": p.edp}


def _matches(row: dict, only: dict) -> bool:
    return all(str(row[k]) == str(v) for k, v in only.items() if k in row)


class _Caches:
    """Figures shared by many candidates of one search, keyed by the degrees they depend on
    (the same functions as `foldmoe validate`, computed once)."""

    def __init__(self, cfg: ModelConfig, train: TrainConfig):
        self.cfg, self.train = cfg, train
        self.trains: dict = {}
        self.ranks: dict = {}
        self.figures: dict = {}
        self.cost: dict = {}

    def trial(self, mbs: int, recompute: str) -> TrainConfig:
        key = (mbs, recompute)
        if key not in self.trains:
            self.trains[key] = replace(self.train, micro_batch_size=mbs, recompute=recompute)
        return self.trains[key]

    def representative(self, p: ParallelConfig) -> list:
        """The representative ranks (memory.rank_infos) of p's pipeline and shard sizes."""
        key = (p.pp, p.vpp, p.tp, p.ep, p.etp)
        if key not in self.ranks:
            self.ranks[key] = rank_infos(self.cfg, p, self.train.seq_len)
        return self.ranks[key]

    def layer_figures(self, p: ParallelConfig, trial: TrainConfig, dispatcher: str):
        key = (p.tp, p.cp, p.ep, p.etp, trial.micro_batch_size, trial.recompute)
        if key not in self.figures:
            self.figures[key] = layer_figures(self.cfg, p, trial, dispatcher=dispatcher)
        return self.figures[key]


def _fits_microbatches(train: TrainConfig, mbs: int, p: ParallelConfig) -> bool:
    per_step = mbs * p.dp
    if train.global_batch_size % per_step:
        return False
    # interleaved 1F1B needs whole rounds of pp micro-batches
    return p.vpp == 1 or (train.global_batch_size // per_step) % p.pp == 0


def search_layouts(cfg: ModelConfig, train: TrainConfig, world: int, machine: Machine, *,
                   memory_limit: float | None, dispatcher: str = "alltoall",
                   space: SearchSpace = SearchSpace(), options: dict | None = None) -> PlanResult:
    """Every feasible layout for `world` GPUs, fastest first (module docstring)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    caches, rows, searched = _Caches(cfg, train), [], 0
    for p in candidate_layouts(cfg, train, world, space, options):
        if not _matches(_degrees(p), space.only):
            continue
        ranks = caches.representative(p)
        states = rank_states(p, train, ranks)
        if memory_limit is not None and max(state for state, _ in states) > memory_limit:
            continue                      # weights and optimizer state alone do not fit
        for mbs in space.micro_batch_sizes:
            if not _fits_microbatches(train, mbs, p) or not _matches({"micro_batch_size": mbs}, space.only):
                continue
            fitted = False
            for recompute in space.recompute:
                if not _matches({"recompute": recompute}, space.only):
                    continue
                trial = caches.trial(mbs, recompute)
                searched += 1
                peak = peak_memory(cfg, p, trial, figures=caches.layer_figures(p, trial, dispatcher), ranks=ranks,
                                   states=states)
                if memory_limit is not None and peak > memory_limit:
                    continue
                est = estimate_step(cfg, p, trial, machine, dispatcher=dispatcher, cache=caches.cost,
                                    ranks=ranks)
                rows.append(PlanRow(p, mbs, recompute, est.step_time_s, est.mfu,
                                    est.tflops_per_gpu, peak, est.breakdown))
                fitted = True
                break                     # costlier recompute modes are never faster
            if not fitted:
                break                     # a larger micro-batch needs more memory still
    rows.sort(key=lambda r: (r.step_time_s, r.memory_bytes))
    return PlanResult(searched, time.perf_counter() - start, time.process_time() - cpu_start, rows)


def why_no_candidate(cfg: ModelConfig, train: TrainConfig, world: int, space: SearchSpace,
                     options: dict | None = None) -> str | None:
    """Why a search with no row had nothing to weigh, or None when some candidate passed
    every rule and filter (memory then ruled them all out). Run only after an empty
    search, so the 1,024-GPU search pays nothing for it."""
    valid = list(candidate_layouts(cfg, train, world, space, options))
    if not valid:
        return (f"no folded layout of {world} ranks is valid: each degree must divide what it "
                f"splits (tp: {cfg.num_heads} heads, {cfg.num_kv_heads} kv heads, vocabulary "
                f"{cfg.vocab_size}; tp x cp, x2 with cp: seq_len {train.seq_len}; pp: "
                f"{cfg.num_layers} layers; ep: {cfg.moe.num_experts} experts; dp = {world}/(tp x cp x pp):"
                f" global_batch_size {train.global_batch_size})")
    wanted = {k: v for k, v in space.only.items() if k in DEGREE_KEYS}
    matching = [p for p in valid if _matches(_degrees(p), wanted)]
    if not matching:
        allowed = "; ".join(f"{k} in {sorted({_degrees(p)[k] for p in valid})}" for k in wanted)
        asked = ",".join(f"{k}={v}" for k, v in wanted.items())
        return f"no valid layout of {world} ranks has {asked} (values valid layouts have: {allowed})"
    sizes = [m for m in space.micro_batch_sizes if _matches({"micro_batch_size": m}, space.only)]
    modes = [r for r in space.recompute if _matches({"recompute": r}, space.only)]
    if not sizes or not modes:
        return (f"the micro-batch sizes searched are {list(space.micro_batch_sizes)} and the "
                f"recompute modes {list(space.recompute)}: none matches the filter")
    if not any(_fits_microbatches(train, m, p) for p in matching for m in sizes):
        return (f"train.global_batch_size={train.global_batch_size} is not a whole number of "
                f"dp x micro_batch_size for any valid layout and micro-batch size {sizes} "
                "(interleaved pipelines also need a multiple of pp micro-batches)")
    return None

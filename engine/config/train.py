"""TrainConfig: what one training run does, independent of the parallel layout."""
from __future__ import annotations

from dataclasses import dataclass

PRECISIONS = ("fp32", "bf16")
PIPELINE_SCHEDULES = ("auto", "gpipe", "1f1b", "interleaved")
LR_DECAYS = ("cosine", "linear", "constant")


def _check_schedule_name(name: str) -> None:
    if name not in PIPELINE_SCHEDULES:
        raise ValueError(f"train.pipeline_schedule={name!r}: expected one of {PIPELINE_SCHEDULES}")


def pipeline_schedule_for(name: str, vpp: int) -> str:
    """The schedule to run: `auto` is interleaved 1F1B with virtual stages (vpp > 1) and 1F1B
    without; an explicit name is honoured or refused with a ValueError naming the keys."""
    _check_schedule_name(name)
    if name == "auto":
        return "interleaved" if vpp > 1 else "1f1b"
    if name == "interleaved" and vpp == 1:
        raise ValueError("train.pipeline_schedule=interleaved needs parallel.vpp > 1")
    if name != "interleaved" and vpp > 1:
        raise ValueError(f"train.pipeline_schedule={name} runs one chunk per rank; parallel.vpp={vpp} "
                         "needs train.pipeline_schedule=interleaved (or auto)")
    return name


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 20
    global_batch_size: int = 8          # sequences per optimizer step, all DP ranks together
    micro_batch_size: int = 1           # sequences per micro-batch per DP rank
    seq_len: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 2
    lr_decay: str = "cosine"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0              # 0 disables clipping
    seed: int = 1234
    precision: str = "fp32"
    recompute: str = "none"             # none | selective | full | remat_aware
    zero1: bool = False                 # shard optimizer state over dp x cp / edp
    overlap_grad_reduce: bool = False   # launch bucket reductions from backward hooks
    overlap_param_gather: bool = False  # ZeRO-1: the params' all-gather runs behind the next forward
    pipeline_schedule: str = "auto"     # auto (1f1b; interleaved when parallel.vpp > 1) | gpipe | 1f1b | interleaved
    eval_every: int = 0                 # val_loss every N steps (and at the last step) on the held-out split; 0 = off
    eval_batches: int = 1               # global batches in the held-out split (engine/data/eval_data.py)

    def __post_init__(self) -> None:
        for key in ("steps", "global_batch_size", "micro_batch_size", "seq_len"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key}={getattr(self, key)}: must be >= 1")
        if self.eval_every < 0 or self.eval_batches < 1:
            raise ValueError(f"train.eval_every={self.eval_every}, train.eval_batches={self.eval_batches}: "
                             "need eval_every >= 0 (0 = off) and eval_batches >= 1")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision={self.precision!r}: expected one of {PRECISIONS}")
        _check_schedule_name(self.pipeline_schedule)
        if self.overlap_param_gather and not self.zero1:
            raise ValueError("train.overlap_param_gather=true needs train.zero1=true: without ZeRO-1 "
                             "every rank updates all its params and there is no all-gather to overlap")
        if self.lr_decay not in LR_DECAYS:
            raise ValueError(f"train.lr_decay={self.lr_decay!r}: expected one of {LR_DECAYS}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"train.lr={self.lr}, train.min_lr={self.min_lr}: need 0 <= min_lr <= lr, lr > 0")

    def num_microbatches(self, dp: int) -> int:
        """Micro-batches per DP rank per step; errors name the keys involved."""
        per_step = self.micro_batch_size * dp
        if self.global_batch_size % per_step:
            raise ValueError(
                f"train.global_batch_size={self.global_batch_size} is not divisible by "
                f"micro_batch_size*dp = {self.micro_batch_size}*{dp} = {per_step}")
        return self.global_batch_size // per_step

"""Learning-rate schedule: a pure function of (step, TrainConfig).

`step` is the 0-based index of the optimizer step about to be taken.
- warmup (step < warmup_steps): lr * (step + 1) / warmup_steps, so the first step is not
  wasted at lr = 0 and step warmup_steps - 1 reaches the peak lr;
- then decay over [warmup_steps, steps] with progress p = (step - warmup) / (steps - warmup),
  clamped to [0, 1]: cosine min_lr + (lr - min_lr) * (1 + cos(pi p)) / 2, linear
  lr - (lr - min_lr) * p, or constant lr. min_lr is reached at step == train.steps (one past
  the last step) and held afterwards.
"""
from __future__ import annotations

import math

from engine.config.train import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < 0:
        raise ValueError(f"lr_at: step={step} must be >= 0")
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_decay == "constant":
        return cfg.lr
    decay_steps = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    if cfg.lr_decay == "cosine":
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr - (cfg.lr - cfg.min_lr) * progress

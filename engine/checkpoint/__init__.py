"""Sharded, hash-verified, atomically published checkpoints and RNG state capture."""
from .manager import (CheckpointError, CheckpointManager, complete_checkpoints, describe_layout_diff,
                      latest_checkpoint)
from .rng import capture_rng_state, restore_rng_state

__all__ = ["CheckpointError", "CheckpointManager", "complete_checkpoints", "describe_layout_diff",
           "latest_checkpoint",
           "capture_rng_state", "restore_rng_state"]

"""Sharded, hash-verified, atomically published checkpoints and RNG state capture."""
from .manager import CheckpointError, CheckpointManager, describe_layout_diff
from .rng import capture_rng_state, restore_rng_state

__all__ = ["CheckpointError", "CheckpointManager", "describe_layout_diff",
           "capture_rng_state", "restore_rng_state"]

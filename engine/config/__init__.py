"""The engine's plain configuration types, at the bottom of the layers so that every
package (models, moe, optim, train, the orchestrator) can share them without cycles."""
from .model import PRESETS, ModelConfig, MoEConfig, get_preset
from .train import TrainConfig
from .job import JobSpec

__all__ = ["PRESETS", "JobSpec", "ModelConfig", "MoEConfig", "TrainConfig", "get_preset"]

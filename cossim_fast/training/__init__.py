"""The UDA trainer: config, data streams, the training loop, checkpoints, DDP and reports."""

from cossim_fast.training.checkpoint import CheckpointError
from cossim_fast.training.config import Config, ConfigError, load_config
from cossim_fast.training.memory import TrainingOutOfMemoryError
from cossim_fast.training.trainer import Trainer, TrainingDivergedError, evaluate

__all__ = [
    "CheckpointError", "Config", "ConfigError", "Trainer", "TrainingDivergedError", "TrainingOutOfMemoryError",
    "evaluate", "load_config",
]

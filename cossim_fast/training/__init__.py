"""The UDA trainer: config, data streams, the training loop, checkpoints, DDP and reports."""

from cossim_fast.training.config import Config, ConfigError, load_config
from cossim_fast.training.trainer import Trainer, evaluate

__all__ = ["Config", "ConfigError", "Trainer", "evaluate", "load_config"]

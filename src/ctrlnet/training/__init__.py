"""ControlNet training: config, data, caches, the accelerate loop, the monitor (checkpoints are
``formats.checkpoint``)."""

from .config import ConfigError, TrainConfig, TrainingError, load_config
from .trainer import train

__all__ = ["ConfigError", "TrainConfig", "TrainingError", "load_config", "train"]

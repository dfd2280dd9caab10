"""ControlNet training: config, data, caches, checkpoints, the accelerate loop, the monitor."""

from .config import TrainConfig, TrainingError, load_config


def train(config: TrainConfig, resume: str | None = None, progress: bool = True):
    """Train a ControlNet as ``config`` says; returns the final diffusers-format folder."""
    from .trainer import train as _train
    return _train(config, resume=resume, progress=progress)


__all__ = ["TrainConfig", "TrainingError", "load_config", "train"]

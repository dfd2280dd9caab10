"""Tiny bases and ShapesWorld data for training tests (built once per session)."""

import pytest

from ctrlnet.testbed.shapes import generate
from ctrlnet.testbed.tiny import write_tiny_base


@pytest.fixture(scope="session")
def tiny_bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {f: str(write_tiny_base(root / f, f)) for f in ("sd15", "sd21", "sdxl")}


@pytest.fixture(scope="session")
def shapes64(tmp_path_factory):
    """16 training and 4 validation ShapesWorld samples at 64 px."""
    root = tmp_path_factory.mktemp("shapes")
    generate(root / "train", 16, seed=0, size=64, workers=1, progress=False)
    generate(root / "val", 4, seed=1, size=64, workers=1, progress=False)
    return root


@pytest.fixture
def make_config(tiny_bases, shapes64, tmp_path):
    """config(family="sd15", **overrides): a config that trains a tiny ControlNet in seconds."""
    from ctrlnet.training import load_config

    def make(family="sd15", **overrides):
        values = dict(base=tiny_bases[family], data=str(shapes64 / "train" / "prompt_canny.json"),
                      output_dir=str(tmp_path / "run"), resolution=64, train_batch_size=2, max_train_steps=4,
                      checkpointing_steps=2, log_every=1, hint_channels=[4, 8, 8, 8], learning_rate=1e-3,
                      validation_steps=1000, tensorboard=False)
        values.update(overrides)
        return load_config(None, values)
    return make

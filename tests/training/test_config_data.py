"""Training config files and overrides; data formats, geometry and bad input."""

import json

import numpy as np
import pytest
from PIL import Image

from ctrlnet.training import TrainConfig, load_config
from ctrlnet.configs import shipped_train_configs
from ctrlnet.training.config import resolve_config_path
from ctrlnet.training.data import ControlDataset, DataError, crop_box, read_records


def test_yaml_toml_and_overrides(tmp_path):
    (tmp_path / "a.yaml").write_text("data: d\nlearning_rate: 2.0e-4\nhint_channels: [4, 8, 8, 8]\ncache: false\n")
    (tmp_path / "a.toml").write_text('data = "d"\nlearning_rate = 2e-4\nhint_channels = [4, 8, 8, 8]\ncache = false\n')
    for name in ("a.yaml", "a.toml"):
        c = load_config(tmp_path / name, ["train_batch_size=8", "random_flip=true", "annotator_params={\"low\": 50}"])
        assert c.learning_rate == 2e-4 and c.hint_channels == [4, 8, 8, 8] and c.cache is False
        assert c.train_batch_size == 8 and c.random_flip is True and c.annotator_params == {"low": 50}
    assert load_config(None, ["data=x", "learning_rate=1"]).learning_rate == 1.0  # int -> float


@pytest.mark.parametrize("override, words", [
    (["lerning_rate=1"], "lerning_rate"),
    (["train_batch_size=four"], "train_batch_size"),
    (["cache=maybe"], "cache"),
    (["mixed_precision=fp8"], "mixed_precision"),
    (["proportion_empty_prompts=1.5"], "proportion_empty_prompts"),
    (["resolution=100"], "resolution"),
    (["learning_rate"], "key=value"),
    (["center_crop=false"], "cache: false"),
    (["timestep_sampling=log"], "timestep_sampling"),
    (["lr_scheduler=linear"], "lr_scheduler"),
    (["ema_decay=1"], "ema_decay"),
])
def test_bad_config_names_the_key(override, words):
    with pytest.raises(ValueError, match=words):
        load_config(None, ["data=x"] + override)


def test_defaults_are_the_originals():
    c = TrainConfig(data="x")
    assert (c.learning_rate, c.train_batch_size, c.mixed_precision, c.proportion_empty_prompts) == (1e-5, 4, "no", 0.5)


def test_shipped_configs_load():
    shipped = shipped_train_configs()
    assert {"nano-canny", "nano-segmentation", "sd15"} <= set(shipped)
    for name in shipped:
        c = load_config(resolve_config_path(name), ["data=x", "base=b"])
        assert c.data == "x"
    with pytest.raises(ValueError, match="'base' is empty"):
        load_config(resolve_config_path("sd15"), ["data=x"])
    sd15 = load_config(resolve_config_path("sd15"), ["data=x", "base=b"])
    assert (sd15.learning_rate, sd15.train_batch_size * sd15.gradient_accumulation_steps) == (1e-5, 4)


def test_record_formats(shapes64, tmp_path):
    fill = read_records(shapes64 / "train")  # folder -> prompt.json (outline condition)
    canny = read_records(shapes64 / "train" / "prompt_canny.json")
    meta = read_records(shapes64 / "train" / "metadata.jsonl")
    assert len(fill) == len(canny) == len(meta) == 16
    assert fill[3].text == canny[3].text == meta[3].text
    assert fill[3].image == meta[3].image and fill[3].condition == meta[3].condition
    assert canny[3].condition.endswith("canny/3.png")
    custom = read_records(shapes64 / "train" / "metadata.jsonl", conditioning_image_column="segmentation")
    assert custom[0].condition.endswith("segmentation/0.png")
    with pytest.raises(DataError, match="missing key 'depth'"):
        read_records(shapes64 / "train" / "metadata.jsonl", conditioning_image_column="depth")
    with pytest.raises(DataError, match="no such file"):
        read_records(tmp_path / "nothing")
    (tmp_path / "bad.jsonl").write_text('{"file_name": "a.png"\n')
    with pytest.raises(DataError, match="bad.jsonl line 1"):
        read_records(tmp_path / "bad.jsonl")


def test_geometry_is_identical_for_image_and_condition(tmp_path):
    # A 96x64 image whose condition is the same picture: every crop/flip must keep them equal.
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "img.png")
    Image.fromarray(pixels).save(tmp_path / "cond.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps(
        {"file_name": "img.png", "conditioning_image": "cond.png", "text": "t"}) + "\n")
    for center in (True, False):
        ds = ControlDataset(read_records(tmp_path), resolution=32, center_crop=center)
        for flip, u in ((False, (0.1, 0.9)), (True, (0.7, 0.2))):
            image, cond = ds.image(0, flip, u), ds.condition(0, flip, u)
            assert image.shape == (32, 32, 3) and np.array_equal(image, cond)
    assert crop_box((32, 48), 32, center=True) == (0, 8)
    assert crop_box((32, 48), 32, center=False, u=(0.99, 0.99)) == (0, 16)


def test_unreadable_image_names_the_file(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps(
        {"file_name": "broken.png", "conditioning_image": "ok.png", "text": "t"}) + "\n")
    ds = ControlDataset(read_records(tmp_path), resolution=8)
    with pytest.raises(DataError, match="broken.png.*skip_bad"):
        ds.image(0)

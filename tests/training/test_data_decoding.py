"""Training images decoded as everywhere else (ctrlnet.images): 16-bit greyscale scaled by its own
range (not stretched to white), EXIF orientation applied (with upright sizes), on the dataset path
and the latent-cache path; and skip_bad counting each unreadable sample once."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ctrlnet.training import train
from ctrlnet.training.data import ControlDataset, image_to_tensor, open_image, read_records
from ctrlnet.training.trainer import Trainer


def write_metadata(folder: Path, rows: list[tuple[str, str]]) -> Path:
    lines = [json.dumps({"file_name": image, "conditioning_image": cond, "text": "t"}) for image, cond in rows]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "metadata.jsonl"


# ---------------------------------------------------------------- 16-bit greyscale


def grey16(peak: int, size: int = 64) -> np.ndarray:
    """A uint16 ramp from 0 to ``peak``: ~1000 is a typical depth map, 65535 the full range."""
    return np.linspace(0, peak, size * size).round().astype(np.uint16).reshape(size, size)


@pytest.mark.parametrize("peak", [1000, 65535])
def test_16bit_greyscale_trains_with_its_own_8bit_values(make_config, tmp_path, peak):
    """A 16-bit PNG maps 65535 -> 255 (v / 257), never stretched to its own maximum: a depth map
    with values up to ~1000 is nearly black, not a white image."""
    pixels = grey16(peak)
    Image.fromarray(pixels).save(tmp_path / "target.png")  # PIL mode I;16: a 16-bit greyscale PNG
    Image.fromarray(pixels).save(tmp_path / "depth.png")
    assert Image.open(tmp_path / "target.png").mode == "I;16"
    expected = np.repeat(np.round(pixels / 257).astype(np.uint8)[:, :, None], 3, axis=2)
    data = write_metadata(tmp_path, [("target.png", "depth.png")] * 2)
    ds = ControlDataset(read_records(data), resolution=64)
    assert np.array_equal(ds.image(0), expected) and np.array_equal(ds.condition(0), expected)
    assert np.array_equal(open_image(Image.open(tmp_path / "target.png"), "row 0"), expected)  # HF datasets: PIL
    # The latent cache encodes the same pixels.
    tr = Trainer(make_config(data=str(data), output_dir=str(tmp_path / "run"), max_train_steps=1), progress=False)
    with torch.no_grad():
        want = tr.base.vae.encode(image_to_tensor([expected])).latent_dist.parameters[0]
    assert torch.allclose(torch.from_numpy(np.array(tr.cache.posterior[0, 0])).float(), want, atol=1e-2)


# ---------------------------------------------------------------- EXIF orientation


def upright_pattern() -> np.ndarray:
    """96 tall x 64 wide: a dark top half, a bright bottom half; any rotation shows."""
    a = np.full((96, 64, 3), 220, np.uint8)
    a[:48] = 30
    return a


def save_sideways_jpeg(upright: np.ndarray, path: Path) -> None:
    """Stored turned 90 degrees counter-clockwise, with EXIF orientation 6 ("rotate 90 CW to view"),
    as a phone writes a portrait."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(path, exif=exif.tobytes(), quality=95)


def assert_upright_crop(a: np.ndarray) -> None:
    """The 64x64 centre crop of the upright pattern: dark top half, bright bottom half."""
    assert a.shape == (64, 64, 3)
    assert a[:30].mean() < 60 and a[34:].mean() > 190, (a[:30].mean(), a[34:].mean())
    assert abs(float(a[:, :32].mean()) - float(a[:, 32:].mean())) < 10  # left and right alike


def test_exif_orientation_training_source_and_target(make_config, tmp_path):
    up = upright_pattern()
    save_sideways_jpeg(up, tmp_path / "sideways.jpg")
    Image.fromarray(up).save(tmp_path / "upright.png")
    assert Image.open(tmp_path / "sideways.jpg").size == (96, 64)  # stored landscape
    # a turned target with an upright condition, and an upright target with a turned condition:
    # the size check compares upright sizes (read from the header), so both pairs are valid
    data = write_metadata(tmp_path, [("sideways.jpg", "upright.png"), ("upright.png", "sideways.jpg")] * 2)
    ds = ControlDataset(read_records(data), resolution=64)
    assert open_image(str(tmp_path / "sideways.jpg"), "x").shape == (96, 64, 3)
    for i in (0, 1):
        assert_upright_crop(ds.image(i))
        assert_upright_crop(ds.condition(i))
    # The cache path: built from the same upright pixels, and the run trains.
    tr = Trainer(make_config(data=str(data), output_dir=str(tmp_path / "run"), max_train_steps=1), progress=False)
    with torch.no_grad():
        want = tr.base.vae.encode(image_to_tensor([ds.image(0)])).latent_dist.parameters[0]
    assert torch.allclose(torch.from_numpy(np.array(tr.cache.posterior[0, 0])).float(), want, atol=1e-2)
    tr.train()


# ---------------------------------------------------------------- skip_bad


@pytest.mark.parametrize("broken, cache", [("outline/4.png", True), ("target/4.png", False)])
def test_skip_bad_counts_distinct_samples(make_config, shapes64, tmp_path, broken, cache):
    """16 samples, 10 steps of 4: every sample is drawn in 3 epochs; the broken one counts once,
    also across a resume. (A broken condition is only found while training, even with the cache;
    without the cache, a broken target too.)"""
    data = tmp_path / "data"
    shutil.copytree(shapes64 / "train", data)
    (data / broken).write_bytes(b"\x89PNG broken")
    cfg = make_config(data=str(data / "metadata.jsonl"), skip_bad=True, cache=cache, train_batch_size=4,
                      max_train_steps=10, checkpointing_steps=5)
    tr = Trainer(cfg, progress=False)
    out = tr.train()
    assert tr.skipped == 1 and tr.bad == {4}
    log = [json.loads(l) for l in (Path(cfg.output_dir) / "log.jsonl").read_text().splitlines() if "loss" in l]
    assert log[-1]["skipped_bad"] == 1
    assert json.loads((out / "training.json").read_text())["skipped_bad"] == 1
    ckpts = Path(cfg.output_dir) / "checkpoints"
    assert json.loads((ckpts / "step-000005" / "state.json").read_text())["bad_samples"] == [4]
    weights = (out / "diffusion_pytorch_model.safetensors").read_bytes()
    shutil.rmtree(out)
    train(cfg, resume=str(ckpts / "step-000005"), progress=False)
    assert json.loads((out / "training.json").read_text())["skipped_bad"] == 1
    assert (out / "diffusion_pytorch_model.safetensors").read_bytes() == weights  # same replacements after resume

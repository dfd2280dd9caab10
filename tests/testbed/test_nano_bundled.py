"""The bundled nano SD: loads through the same loader as a real SD folder, and in diffusers."""

import json

import torch

from ctrlnet.base import load_base
from ctrlnet.pipeline import text_to_image
from ctrlnet.testbed import NANO_SD


def test_bundled_nano_loads_and_draws():
    base = load_base(NANO_SD)
    assert base.vae_scale_factor == 8 and base.unet.config.sample_size == 16
    assert base.prediction_type == "v_prediction"
    assert all(len(base.tokenizer(w).input_ids) == 3 for w in ("red", "triangle", "background"))
    images = text_to_image(base, ["a red circle on a white background"], steps=4, seed=0)
    assert images.shape == (1, 128, 128, 3) and images.std() > 5  # an image, not a flat field
    size = sum(p.stat().st_size for p in NANO_SD.rglob("*") if p.is_file())
    assert size < 40 * 2 ** 20
    assert not list(NANO_SD.rglob("*.bin")) and not list(NANO_SD.rglob("*.pt*"))
    training = json.loads((NANO_SD / "TRAINING.json").read_text())
    assert training["sd"]["steps"] > 0 and training["commands"]


def test_diffusers_pipeline_loads_the_bundled_nano():
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(NANO_SD, safety_checker=None, requires_safety_checker=False,
                                                   local_files_only=True)
    base = load_base(NANO_SD)
    assert torch.equal(pipe.unet.conv_in.weight, base.unet.conv_in.weight)

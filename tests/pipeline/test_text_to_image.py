"""The base text-to-image loop on tiny models (epsilon and v-prediction)."""

import numpy as np
import pytest
import torch

from ctrlnet.base import load_base
from ctrlnet.pipeline import rescale_noise_cfg, text_to_image
from ctrlnet.testbed.tiny import write_tiny_base


@pytest.mark.parametrize("family", ["sd15", "sd21"])
def test_images_are_finite_sized_and_reproducible(tmp_path, family):
    base = load_base(write_tiny_base(tmp_path / family, family))
    a = text_to_image(base, ["a red circle", "a blue square"], steps=3, guidance=2.0, seed=5)
    assert a.shape == (2, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, text_to_image(base, ["a red circle", "a blue square"], steps=3, guidance=2.0, seed=5))
    # Sample 1 of seed 5 is sample 0 of seed 6 (same noise; batch size changes only float rounding).
    b = text_to_image(base, ["a blue square"], steps=3, guidance=2.0, seed=6)
    assert np.abs(a[1].astype(int) - b[0]).max() <= 2
    if family == "sd15":  # (the random tiny sd21 text path is too weak to move uint8 pixels)
        c = text_to_image(base, ["a red circle"], steps=3, guidance=2.0, seed=6)
        assert not np.array_equal(b[0], c[0])  # the prompt matters


def test_rescale_matches_diffusers():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg as reference
    g = torch.Generator().manual_seed(0)
    guided, cond = torch.randn(2, 4, 8, 8, generator=g) * 3, torch.randn(2, 4, 8, 8, generator=g)
    assert torch.allclose(rescale_noise_cfg(guided, cond, 0.7), reference(guided, cond, 0.7), atol=1e-6)
    assert torch.equal(rescale_noise_cfg(guided, cond, 0.0), guided)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_controlnets_in_the_loop(tmp_path, family):
    """A zero-initialised ControlNet leaves the images bit-identical; a trained-looking one changes
    them, and scale 0 switches it off."""
    from ctrlnet.models import ControlNet
    base = load_base(write_tiny_base(tmp_path / family, family))
    net = ControlNet.from_unet(base.unet, conditioning_embedding_out_channels=(4, 8, 8, 8)).eval()
    cond = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    prompts = ["a red circle", "a blue square"]
    plain = text_to_image(base, prompts, steps=3, guidance=2.0, seed=1)
    zero = text_to_image(base, prompts, steps=3, guidance=2.0, seed=1, controlnets=[net], conditions=[cond])
    assert np.array_equal(plain, zero)
    with torch.no_grad():
        for p in net.controlnet_mid_block.parameters():
            p.normal_(0, 2.0, generator=torch.Generator().manual_seed(1))
    moved = text_to_image(base, prompts, steps=3, guidance=2.0, seed=1, controlnets=[net], conditions=[cond])
    assert not np.array_equal(plain, moved)
    off = text_to_image(base, prompts, steps=3, guidance=2.0, seed=1, controlnets=[net], conditions=[cond],
                        scales=[0.0])
    assert np.array_equal(plain, off)
    with pytest.raises(ValueError, match="1 ControlNets but 0 conditions"):
        text_to_image(base, prompts, steps=1, controlnets=[net], conditions=[])


def test_numbers_are_range_checked(tmp_path):
    """The same ranges as Pipeline's (ranges.RANGES); no random seed here (nothing would report it)."""
    base = load_base(write_tiny_base(tmp_path / "sd15", "sd15"))
    for kwargs, message in [({"guidance": float("nan")}, "guidance: nan is not a number in [0, 100]"),
                            ({"steps": 0}, "steps: 0 is not an integer in [1, 1000]"),
                            ({"width": 0}, "width: 0 is not an integer in [1, 8192]"),
                            ({"guidance_rescale": -0.1}, "guidance_rescale: -0.1 is not a number in [0, 1]"),
                            ({"seed": -1}, "seed: -1 (random) needs a caller that reports the seed drawn"),
                            ({"seed": 2 ** 32 - 1}, "seed: 4294967295 with 2 images runs past")]:
        with pytest.raises(ValueError) as e:
            text_to_image(base, ["a", "b"], **{"steps": 1, **kwargs})
        assert message in str(e.value), str(e.value)

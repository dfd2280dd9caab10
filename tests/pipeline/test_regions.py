"""Regional prompting: composition rule, plumbing through CFG / control modes / SDXL, the CLI."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ctrlnet.base import load_base
from ctrlnet.pipeline import Control, Pipeline, Region
from ctrlnet.pipeline.sampling import compose_regions
from ctrlnet.testbed.tiny import write_tiny_base

from test_pipeline import condition, trained_looking


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("region-bases")
    return {f: write_tiny_base(root / f, f) for f in ("sd15", "sdxl")}


def test_compose_regions_known_values():
    cond = torch.zeros(1, 1, 1, 4)
    regions = torch.stack([torch.full((1, 1, 1, 4), 1.0), torch.full((1, 1, 1, 4), 3.0)])  # (R=2, B, C, h, w)
    w = torch.tensor([[1.0, 0.5, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]]).view(2, 1, 1, 1, 4)
    out = compose_regions(cond, regions, w).flatten().tolist()
    # inside region 0 only: its value; half inside: half of it; outside: the main prompt's; overlap (2 > 1): mean
    assert out == [1.0, 0.5, 0.0, 2.0]


WHITE, BLACK = np.full((64, 64), 255, np.uint8), np.zeros((64, 64), np.uint8)


@pytest.mark.parametrize("family,mode,guidance", [("sd15", "balanced", 5.0), ("sd15", "control", 5.0),
                                                  ("sd15", "balanced", 1.0), ("sdxl", "balanced", 5.0)])
def test_a_full_region_replaces_the_prompt_and_an_empty_one_changes_nothing(bases, family, mode, guidance):
    base = load_base(bases[family])
    pipe = Pipeline(base, {"net": trained_looking(base)})
    kw = dict(controls=[Control("net", condition(), mode=mode)], steps=3, guidance=guidance, seed=2,
              output_type="latent")
    red = pipe("a red circle", **kw).latents
    blue = pipe("a blue square", **kw).latents
    assert (red - blue).abs().max() > 1e-3
    full = pipe("a red circle", regions=[Region("a blue square", WHITE)], **kw).latents
    assert torch.allclose(full, blue, atol=1e-5)  # the region's prompt everywhere == that prompt alone
    empty = pipe("a red circle", regions=[Region("a blue square", BLACK)], **kw).latents
    assert torch.allclose(empty, red, atol=1e-5)
    left = WHITE.copy()
    left[:, 32:] = 0
    half = pipe("a red circle", regions=[Region("a blue square", Image.fromarray(left))], **kw).latents
    assert (half - red).abs().max() > 1e-3 and (half - blue).abs().max() > 1e-3


def test_regions_per_prompt_equal_separate_calls(bases):
    base = load_base(bases["sd15"])
    pipe = Pipeline(base, {"net": trained_looking(base)})
    left = WHITE.copy()
    left[:, 32:] = 0
    kw = dict(controls=[Control("net", condition())], steps=3, guidance=4.0, output_type="latent")
    both = pipe(["a red circle", "a green circle"], regions=[[], [Region("a blue square", left)]], seed=0,
                num_images=2, **kw)
    first = pipe("a red circle", seed=0, num_images=2, **kw)  # no regions: padded with an empty one above
    second = pipe("a green circle", regions=[Region("a blue square", left)], seed=2, num_images=2, **kw)
    assert torch.allclose(both.latents[:2], first.latents, atol=1e-5)
    assert torch.allclose(both.latents[2:], second.latents, atol=1e-5)
    assert 'Region 0: "a blue square"' in both.parameters[2] and "Region" not in both.parameters[0]
    with pytest.raises(ValueError, match="1 lists for 2 prompts"):
        pipe(["x", "y"], regions=[[Region("z", left)]], steps=1)


def test_cli_region(tmp_path):
    exe = Path(sys.executable).parent / "ctrlnet"
    mask = tmp_path / "left.png"
    Image.fromarray(np.pad(np.full((128, 64), 255, np.uint8), ((0, 0), (0, 64)))).save(mask)
    r = subprocess.run([str(exe), "generate", "--prompt", "a red circle and a blue square on a white background",
                        "--region", f"{mask}=a red circle on a white background", "--steps", "2",
                        "--out", str(tmp_path / "out.png")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert 'Region 0: "a red circle on a white background"' in Image.open(tmp_path / "out.png").info["parameters"]
    r = subprocess.run([str(exe), "generate", "--prompt", "x", "--region", "missing.png=a circle", "--steps", "1",
                        "--out", str(tmp_path / "x.png")], capture_output=True, text=True)
    assert r.returncode == 2 and "--region 'missing.png=a circle': no such mask file" in r.stderr, r.stderr
    assert r.stderr.count("missing.png") == 1 and "Traceback" not in r.stderr


def test_small_masks_are_resized_as_areas_not_thinned_like_edges(bases):
    """A sparse white-on-black mask looks like an edge map; it must keep its area when resized."""
    from ctrlnet.images import resize_plain, resize_to
    pipe = Pipeline(load_base(bases["sd15"]))
    small = np.zeros((32, 32), np.uint8)
    small[8:16, 8:16] = 255  # 1/16 of the image
    batch = pipe.prepare_regions(Region("a blue square", small), 1, 1, 64, 64)  # a single Region is accepted
    w = batch.weights  # (1, 1, 1, 8, 8) on the latent grid
    assert w.shape == (1, 1, 1, 8, 8) and abs(float(w.sum()) - 64 / 16) < 0.5
    assert float(w[0, 0, 0, 2:4, 2:4].min()) > 0.9  # the square's interior is fully inside
    big = resize_to(np.repeat(small[:, :, None], 3, 2), 64, 64, resize=resize_plain)[..., 0]
    assert abs((big > 127).mean() - 1 / 16) < 0.01  # the inpainting mask path: same rule

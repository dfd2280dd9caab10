"""The bundled nano ControlNets: load by name, in diffusers too, and they control the nano base."""

import json

import numpy as np
import pytest
import torch

from ctrlnet.base import load_base
from ctrlnet.eval.control import controllability
from ctrlnet.formats import load_controlnet
from ctrlnet.pipeline import text_to_image
from ctrlnet.testbed import NANO_SD, bundled_controlnets
from ctrlnet.testbed.shapes import render, sample_layout
from ctrlnet.training.data import condition_to_tensor

BUNDLED = bundled_controlnets()


def test_canny_and_segmentation_are_bundled_as_safetensors():
    assert {"nano-canny", "nano-segmentation"} <= set(BUNDLED)
    for path in BUNDLED.values():
        files = {p.name for p in path.iterdir()}
        assert files == {"config.json", "diffusion_pytorch_model.safetensors", "TRAINING.json"}
        record = json.loads((path / "TRAINING.json").read_text())
        assert record["steps"] > 0 and record["seed"] == 0 and any("ctrlnet train" in c for c in record["commands"])


@pytest.mark.parametrize("name", ["nano-canny", "nano-segmentation"])
def test_bundled_controlnet_controls_the_nano_base(name):
    net = load_controlnet(name, dtype=torch.float32).eval()  # a bundled name, not a path
    from diffusers import ControlNetModel
    theirs = ControlNetModel.from_pretrained(BUNDLED[name], local_files_only=True).state_dict()
    assert all(torch.equal(theirs[k].float(), v) for k, v in net.state_dict().items())
    base = load_base(NANO_SD)
    kind = name.split("-", 1)[1]
    samples = [sample_layout(i, seed=11, size=128) for i in range(4)]  # not in any training set (seed 11)
    maps = [render(s, 128) for s in samples]
    prompts = [s.prompt for s in samples]
    controlled = text_to_image(base, prompts, steps=10, seed=0, controlnets=[net],
                               conditions=[condition_to_tensor([m[kind] for m in maps])])
    plain = text_to_image(base, prompts, steps=10, seed=0)
    iou = np.mean([controllability(g, m["target"])["iou"] for g, m in zip(controlled, maps)])
    iou_plain = np.mean([controllability(g, m["target"])["iou"] for g, m in zip(plain, maps)])
    assert iou > 0.6 and iou > iou_plain + 0.3, (iou, iou_plain)

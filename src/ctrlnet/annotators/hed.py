"""HED soft edges: ControlNet 1.1's ``ControlNetHED_Apache2`` (lllyasviel's Apache-2.0 retrained HED,
an RGB-input VGG-style net with five side outputs), as ``softedge_hed``, ``softedge_hedsafe`` and
``scribble_hed`` (the A1111 extension's module names).

Weights: ``ControlNetHED.pth`` from https://huggingface.co/lllyasviel/Annotators (a plain state
dict, fp16: ``norm``, ``block1.convs.0.weight``, ..., ``block5.projection.bias``; 37 tensors,
14,716,168 parameters), loaded into fp32.

Processing (ControlNet 1.1 ``annotator/hed/__init__.py``; A1111 ``annotator/hed`` and
``scripts/preprocessor/legacy/processor.py``):

- the input is RGB 0..255 as float (no scaling: the net subtracts its learnt ``norm`` itself), padded
  at the bottom / right with its edge pixels to a multiple of 64 (A1111's ``resize_image_with_pad``;
  ControlNet 1.1 resizes to multiples of 64 instead), the map cropped back afterwards;
- each of the five side outputs (1, 1/2, ..., 1/16 scale) is resized to the input size with
  bilinear interpolation (OpenCV), their mean goes through a sigmoid (float64);
- ``softedge_hedsafe``: ``safe_step`` quantisation to 3 levels (0, 0.5, 1), so the net cannot read
  hidden fine detail from the map;
- ``scribble_hed``: A1111's ``scribble_hed`` recipe on the soft map: ``nms`` (Gaussian sigma 3,
  directional non-maximum suppression, > 127), Gaussian blur sigma 3, every pixel > 4 white (the same
  steps as ControlNet 1.1's ``gradio_scribble.py`` and controlnet_aux's ``HEDdetector(scribble=True)``,
  which run them after resizing to the output resolution; A1111, followed here, at the detection size).

White edges on black, (H, W, 3) uint8 at the input size. The batched form runs several same-size
images in one forward pass.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import weights
from .softedge import safe_step
from .weights import Weights

HED = Weights("ControlNetHED.pth", ("lllyasviel/Annotators",),
              "the HED soft-edge network (ControlNet 1.1's ControlNetHED_Apache2)")
PAD = 64  # A1111 pads the detector's input to a multiple of 64 (the side outputs then line up exactly)


# --- network ---------------------------------------------------------------------------------

class DoubleConvBlock(nn.Module):
    """``layers`` 3x3 conv + ReLU (after an optional 2x2 max pool), and a 1x1 side output."""

    def __init__(self, cin: int, cout: int, layers: int):
        super().__init__()
        self.convs = nn.Sequential(*[nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1) for i in range(layers)])
        self.projection = nn.Conv2d(cout, 1, 1)

    def forward(self, x: torch.Tensor, down_sampling: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.max_pool2d(x, 2, 2) if down_sampling else x
        for conv in self.convs:
            h = F.relu(conv(h))
        return h, self.projection(h)  # (N, C, h, w), (N, 1, h, w)


class ControlNetHED_Apache2(nn.Module):
    """(N, 3, H, W) RGB 0..255 -> five (N, 1, H / 2**k, W / 2**k) edge logits, k = 0..4."""

    def __init__(self):
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))  # learnt mean colour
        self.block1 = DoubleConvBlock(3, 64, 2)
        self.block2 = DoubleConvBlock(64, 128, 2)
        self.block3 = DoubleConvBlock(128, 256, 3)
        self.block4 = DoubleConvBlock(256, 512, 3)
        self.block5 = DoubleConvBlock(512, 512, 3)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = x - self.norm
        out = []
        for k, block in enumerate((self.block1, self.block2, self.block3, self.block4, self.block5)):
            h, side = block(h, down_sampling=k > 0)
            out.append(side)
        return out


def load(name: str, model: str = "") -> ControlNetHED_Apache2:
    """The HED network of ``model`` (or the one ``weights.find`` finds), fp32 on ``weights.device()``."""
    path = weights.find(name, HED, model)

    def build() -> ControlNetHED_Apache2:
        state = weights.strip_prefix(weights.read_state_dict(path, name, HED.what))
        net = weights.load_strict(ControlNetHED_Apache2(), state, path, name, HED.what)
        return net.float().to(weights.device())  # the published file is fp16: load_strict copied it into fp32
    return weights.cached(path, "hed", build)


# --- pre / post-processing -------------------------------------------------------------------

def pad_to(images: np.ndarray, multiple: int = PAD) -> np.ndarray:
    """(N, H, W, C) padded at the bottom / right with edge pixels to multiples of ``multiple``."""
    h, w = images.shape[1:3]
    return np.pad(images, ((0, 0), (0, -h % multiple), (0, -w % multiple), (0, 0)), mode="edge")


def fuse(sides: list[np.ndarray], h: int, w: int) -> np.ndarray:
    """Five (h_k, w_k) float32 side logits -> (h, w) float64 edge probability: each resized to (h, w)
    bilinearly, their mean through a sigmoid."""
    maps = np.stack([cv2.resize(s, (w, h), interpolation=cv2.INTER_LINEAR) for s in sides], axis=2)
    with np.errstate(over="ignore"):  # exp overflow is 1 / inf = 0, as in the original
        return 1.0 / (1.0 + np.exp(-np.mean(maps, axis=2).astype(np.float64)))


def to_map(edge: np.ndarray, safe: bool = False) -> np.ndarray:
    """(H, W) edge probability in [0, 1] -> (H, W) uint8 (``safe``: 3 levels)."""
    if safe:
        edge = safe_step(edge)
    return (edge * 255.0).clip(0, 255).astype(np.uint8)


def nms(x: np.ndarray, threshold: float, sigma: float) -> np.ndarray:
    """ControlNet 1.1 ``annotator/util.py`` ``nms``: (H, W) -> (H, W) uint8 0 / 255: ``x`` blurred
    (Gaussian ``sigma``), a pixel kept where it is the maximum of its 3-pixel line in any of the 4
    directions (horizontal, vertical, both diagonals), then white where the kept value > ``threshold``."""
    x = cv2.GaussianBlur(x.astype(np.float32), (0, 0), sigma)
    lines = [np.array(k, np.uint8) for k in ([[0, 0, 0], [1, 1, 1], [0, 0, 0]], [[0, 1, 0], [0, 1, 0], [0, 1, 0]],
                                             [[1, 0, 0], [0, 1, 0], [0, 0, 1]], [[0, 0, 1], [0, 1, 0], [1, 0, 0]])]
    kept = np.zeros_like(x)
    for kernel in lines:
        np.putmask(kept, cv2.dilate(x, kernel=kernel) == x, x)
    return np.where(kept > threshold, 255, 0).astype(np.uint8)


def scribble_from(soft: np.ndarray) -> np.ndarray:
    """A1111 ``scribble_hed`` / ``scribble_pidinet``: (H, W) uint8 soft edges -> (H, W) uint8 0 / 255
    strokes: nms (> 127, sigma 3), blurred (sigma 3) to thicken, every pixel > 4 white."""
    strokes = cv2.GaussianBlur(nms(soft, 127, 3.0), (0, 0), 3.0)
    return np.where(strokes > 4, 255, 0).astype(np.uint8)


def rgb3(a: np.ndarray) -> np.ndarray:
    """(H, W) -> (H, W, 3)."""
    return np.repeat(a[:, :, None], 3, axis=2)


def hed_edges(images: list[np.ndarray], name: str, model: str = "") -> list[np.ndarray]:
    """Same-size (H, W, 3) uint8 RGB images -> (H, W) float64 edge probabilities, one forward pass."""
    net = load(name, model)
    h, w = images[0].shape[:2]
    batch = pad_to(np.stack(images))  # (N, H', W', 3), H' and W' multiples of 64
    hp, wp = batch.shape[1:3]
    x = torch.from_numpy(batch).to(weights.device()).permute(0, 3, 1, 2).float()  # (N, 3, H', W') 0..255
    with torch.inference_mode():
        sides = [s[:, 0].float().cpu().numpy() for s in net(x)]  # 5 x (N, H' / 2**k, W' / 2**k)
    return [fuse([s[n] for s in sides], hp, wp)[:h, :w] for n in range(len(images))]


# --- annotators ------------------------------------------------------------------------------

def softedge_hed_batch(images: list[np.ndarray], model: str = "") -> list[np.ndarray]:
    return [rgb3(to_map(e)) for e in hed_edges(images, "softedge_hed", model)]


def softedge_hedsafe_batch(images: list[np.ndarray], model: str = "") -> list[np.ndarray]:
    return [rgb3(to_map(e, safe=True)) for e in hed_edges(images, "softedge_hedsafe", model)]


def scribble_hed_batch(images: list[np.ndarray], model: str = "") -> list[np.ndarray]:
    return [rgb3(scribble_from(to_map(e))) for e in hed_edges(images, "scribble_hed", model)]


def softedge_hed(image: np.ndarray, model: str = "") -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W, 3) uint8 HED soft edges."""
    return softedge_hed_batch([image], model)[0]


def softedge_hedsafe(image: np.ndarray, model: str = "") -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W, 3) uint8 HED soft edges quantised to 0, 127, 255."""
    return softedge_hedsafe_batch([image], model)[0]


def scribble_hed(image: np.ndarray, model: str = "") -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W, 3) uint8 0 / 255 scribble strokes from HED edges."""
    return scribble_hed_batch([image], model)[0]


ANNOTATORS = {"softedge_hed": softedge_hed, "softedge_hedsafe": softedge_hedsafe, "scribble_hed": scribble_hed}
PARAMS: dict = {name: {} for name in ANNOTATORS}  # the originals have none (safe is its own annotator)
WEIGHTS = {name: (HED,) for name in ANNOTATORS}
BATCH = {"softedge_hed": softedge_hed_batch, "softedge_hedsafe": softedge_hedsafe_batch,
         "scribble_hed": scribble_hed_batch}


def write_random_weights(folder: Path, seed: int = 0) -> None:
    """``folder/ControlNetHED.pth`` in the published layout (plain state dict, fp16), the full-size
    network with its random init, seeded."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):  # the caller's random state is left alone
        torch.manual_seed(seed)
        net = ControlNetHED_Apache2()
    torch.save({k: v.half() for k, v in net.state_dict().items()}, folder / HED.file)

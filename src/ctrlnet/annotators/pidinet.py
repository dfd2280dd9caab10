"""PiDiNet soft edges (Su et al., "Pixel Difference Networks for Efficient Edge Detection", 2021;
https://github.com/hellozhuo/pidinet), as ``softedge_pidinet``, ``softedge_pidisafe`` and
``scribble_pidinet`` (the A1111 extension's module names).

Weights: ``table5_pidinet.pth`` from https://huggingface.co/lllyasviel/Annotators (the paper's
table 5 model: config ``carv4``, 60 channels, CDCM dilation 24, CSAM attention; the state dict
nested under ``state_dict`` with DataParallel's ``module.`` prefix; 83 tensors, 710,149 parameters).

The file holds pixel-difference convolutions (central ``cd``, angular ``ad``, radial ``rd``, and
vanilla ``cv``, by layer). They are linear in the input, so at load time each becomes the plain
kernel it equals (``convert_pidinet``, as the PiDiNet repository's ``convert_pidinet.py``: ``cd``
and ``ad`` stay 3x3, ``rd`` becomes 5x5), and the network here is that converted, vanilla-conv form
(the outputs are the same up to float rounding; the tests check it against the pixel-difference form).

Processing (ControlNet 1.1 ``annotator/pidinet/__init__.py``; A1111 ``annotator/pidinet`` and
``scripts/preprocessor/legacy/processor.py``):

- the input is BGR (the channels reversed: the net was trained on OpenCV images) / 255, padded at
  the bottom / right with its edge pixels to a multiple of 64 (A1111's ``resize_image_with_pad``),
  the map cropped back afterwards;
- the map is the fused output (the sigmoid of the classifier over the four side outputs, upsampled
  bilinearly to the input size), float32;
- ``softedge_pidisafe``: ``safe_step`` quantisation to 3 levels (0, 0.5, 1);
- ``scribble_pidinet``: A1111's ``scribble_pidinet``: ``nms`` (sigma 3, > 127), Gaussian blur sigma
  3, every pixel > 4 white (``hed.scribble_from``; controlnet_aux's ``PidiNetDetector(scribble=True)``
  does the same after resizing to the output resolution).

White edges on black, (H, W, 3) uint8 at the input size. The batched form runs several same-size
images in one forward pass.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import weights
from .hed import pad_to, rgb3, scribble_from
from .softedge import safe_step
from .weights import Weights

PIDINET = Weights("table5_pidinet.pth", ("lllyasviel/Annotators",),
                  "the PiDiNet soft-edge network (table5_pidinet, config carv4)")

# Config ``carv4``: the operation of layer 0 (``init_block``) and of each block's depthwise ``conv1``.
PDCS = ("cd", "ad", "rd", "cv") * 4
BLOCKS = ("block1_1", "block1_2", "block1_3", "block2_1", "block2_2", "block2_3", "block2_4",
          "block3_1", "block3_2", "block3_3", "block3_4", "block4_1", "block4_2", "block4_3", "block4_4")
# The weight each layer's operation applies to: layer 0, then blocks 1..15.
PDC_KEYS = ("init_block.weight",) + tuple(f"{b}.conv1.weight" for b in BLOCKS)
WIDTH, DILATION = 60, 24  # ``pidinet()``: PiDiNet(60, carv4, dil=24, sa=True)

# ``ad``: each kernel tap minus the tap before it clockwise (3x3 positions, row-major).
AD_PREVIOUS = [3, 0, 1, 6, 4, 2, 7, 8, 5]
# ``rd``: the 8 outer taps of a 5x5 kernel (distance 2) and the inner ones (distance 1), same directions.
RD_OUTER = [0, 2, 4, 10, 14, 20, 22, 24]
RD_INNER = [6, 7, 8, 11, 13, 16, 17, 18]


def convert_pdc(op: str, weight: torch.Tensor) -> torch.Tensor:
    """A pixel-difference conv's (O, I, 3, 3) weight -> the plain kernel it equals: (O, I, 3, 3), or
    (O, I, 5, 5) for ``rd`` (padding 2)."""
    o, i = weight.shape[:2]
    flat = weight.reshape(o, i, 9)
    if op == "cv":
        return weight
    if op == "cd":  # sum_k w_k (x_k - x_centre): the centre tap loses the sum of all taps
        flat = flat.clone()
        flat[:, :, 4] -= weight.sum(dim=(2, 3))
        return flat.reshape(o, i, 3, 3)
    if op == "ad":  # sum_k w_k (x_k - x_clockwise_next(k)), regrouped by pixel
        return (flat - flat[:, :, AD_PREVIOUS]).reshape(o, i, 3, 3)
    if op == "rd":  # sum_k w_k (x_at_2d_k - x_at_d_k) over the 8 directions d_k, taps 1..8 of the 3x3 weight
        out = weight.new_zeros(o, i, 25)
        out[:, :, RD_OUTER] = flat[:, :, 1:]
        out[:, :, RD_INNER] = -flat[:, :, 1:]
        return out.reshape(o, i, 5, 5)
    raise ValueError(f"unknown pixel-difference operation {op!r}")


def convert_pidinet(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``carv4`` PiDiNet state dict (no prefix) with its pixel-difference weights as plain kernels
    (others are left as they are; ``load`` refuses files whose pixel-difference weights are not 3x3)."""
    out = dict(state)
    for op, key in zip(PDCS, PDC_KEYS):
        w = state.get(key)
        if w is not None and w.dim() == 4 and tuple(w.shape[2:]) == (3, 3):
            out[key] = convert_pdc(op, w.float())
    return out


# --- network (converted form) ----------------------------------------------------------------

class PDCBlock_converted(nn.Module):
    """Depthwise conv (3x3, 5x5 for ``rd``) -> ReLU -> 1x1 conv, plus the input (after a 2x2 max
    pool and a 1x1 shortcut conv when ``stride`` is 2)."""

    def __init__(self, pdc: str, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.stride = stride
        if stride > 1:
            self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
            self.shortcut = nn.Conv2d(cin, cout, 1)
        k = 5 if pdc == "rd" else 3
        self.conv1 = nn.Conv2d(cin, cin, k, padding=k // 2, groups=cin, bias=False)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = self.pool(x)
        y = self.conv2(self.relu2(self.conv1(x)))
        return y + (self.shortcut(x) if self.stride > 1 else x)


class CSAM(nn.Module):
    """Compact spatial attention: x * sigmoid(conv3x3(conv1x1(relu(x))))."""

    def __init__(self, channels: int):
        super().__init__()
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(channels, 4, 1)
        self.conv2 = nn.Conv2d(4, 1, 3, padding=1, bias=False)
        self.sigmoid = nn.Sigmoid()
        nn.init.constant_(self.conv1.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.sigmoid(self.conv2(self.conv1(self.relu1(x))))


class CDCM(nn.Module):
    """Compact dilated convolutions: relu -> 1x1 conv -> the sum of 3x3 convs dilated 5, 7, 9, 11."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(cin, cout, 1)
        self.conv2_1 = nn.Conv2d(cout, cout, 3, dilation=5, padding=5, bias=False)
        self.conv2_2 = nn.Conv2d(cout, cout, 3, dilation=7, padding=7, bias=False)
        self.conv2_3 = nn.Conv2d(cout, cout, 3, dilation=9, padding=9, bias=False)
        self.conv2_4 = nn.Conv2d(cout, cout, 3, dilation=11, padding=11, bias=False)
        nn.init.constant_(self.conv1.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(self.relu1(x))
        return self.conv2_1(x) + self.conv2_2(x) + self.conv2_3(x) + self.conv2_4(x)


class MapReduce(nn.Module):
    """1x1 conv to one edge map."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 1)
        nn.init.constant_(self.conv.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class PiDiNet(nn.Module):
    """The converted ``carv4`` PiDiNet (60 channels, dil 24, attention):
    (N, 3, H, W) BGR in [0, 1] -> (N, 1, H, W) fused edge probability."""

    def __init__(self):
        super().__init__()
        c = WIDTH
        init_k = 5 if PDCS[0] == "rd" else 3
        self.init_block = nn.Conv2d(3, c, init_k, padding=init_k // 2, bias=False)
        planes = [c, c, c, c, 2 * c, 2 * c, 2 * c, 2 * c, 4 * c, 4 * c, 4 * c, 4 * c, 4 * c, 4 * c, 4 * c, 4 * c]
        for n, name in enumerate(BLOCKS, start=1):
            stride = 2 if name.endswith("_1") and n > 1 else 1  # block2_1, block3_1, block4_1 halve the size
            setattr(self, name, PDCBlock_converted(PDCS[n], planes[n - 1], planes[n], stride))
        fuseplanes = [c, 2 * c, 4 * c, 4 * c]  # x1, x2, x3, x4
        self.dilations = nn.ModuleList([CDCM(p, DILATION) for p in fuseplanes])
        self.attentions = nn.ModuleList([CSAM(DILATION) for _ in fuseplanes])
        self.conv_reduces = nn.ModuleList([MapReduce(DILATION) for _ in fuseplanes])
        self.classifier = nn.Conv2d(4, 1, 1)
        nn.init.constant_(self.classifier.weight, 0.25)
        nn.init.constant_(self.classifier.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2:]
        x = self.init_block(x)  # (N, 60, H, W)
        x1 = self.block1_3(self.block1_2(self.block1_1(x)))  # (N, 60, H, W)
        x2 = self.block2_4(self.block2_3(self.block2_2(self.block2_1(x1))))  # (N, 120, H / 2, W / 2)
        x3 = self.block3_4(self.block3_3(self.block3_2(self.block3_1(x2))))  # (N, 240, H / 4, W / 4)
        x4 = self.block4_4(self.block4_3(self.block4_2(self.block4_1(x3))))  # (N, 240, H / 8, W / 8)
        stages = (x1, x2, x3, x4)
        sides = [F.interpolate(reduce(att(dil(xi))), (h, w), mode="bilinear", align_corners=False)
                 for xi, dil, att, reduce in zip(stages, self.dilations, self.attentions, self.conv_reduces)]
        return torch.sigmoid(self.classifier(torch.cat(sides, dim=1)))  # (N, 1, H, W)


def load(name: str, model: str = "") -> PiDiNet:
    """The converted PiDiNet of ``model`` (or the one ``weights.find`` finds), fp32 on ``weights.device()``."""
    path = weights.find(name, PIDINET, model)

    def build() -> PiDiNet:
        state = weights.strip_prefix(weights.read_state_dict(path, name, PIDINET.what))  # unwraps "state_dict"
        odd = [k for k in PDC_KEYS if k in state and tuple(state[k].shape[2:]) != (3, 3)]
        if odd:  # e.g. an already converted file: its cd / ad kernels could not be told from unconverted ones
            raise weights.WeightsError(f"annotator {name!r}: {path} is not {PIDINET.what}: {odd[0]} has shape "
                                       f"{tuple(state[odd[0]].shape)}, expected 3x3 pixel-difference weights "
                                       f"(the published, unconverted layout)")
        net = weights.load_strict(PiDiNet(), convert_pidinet(state), path, name, PIDINET.what)
        return net.float().to(weights.device())
    return weights.cached(path, "pidinet", build)


# --- pre / post-processing -------------------------------------------------------------------

def to_input(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 RGB -> (N, 3, H, W) float32 BGR in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images[..., ::-1])).permute(0, 3, 1, 2).float() / 255.0


def to_map(edge: np.ndarray, safe: bool = False) -> np.ndarray:
    """(H, W) float32 edge probability -> (H, W) uint8 (``safe``: 3 levels)."""
    if safe:
        edge = safe_step(edge)
    return (edge * 255.0).clip(0, 255).astype(np.uint8)


def pidinet_edges(images: list[np.ndarray], name: str, model: str = "") -> list[np.ndarray]:
    """Same-size (H, W, 3) uint8 RGB images -> (H, W) float32 edge probabilities, one forward pass."""
    net = load(name, model)
    h, w = images[0].shape[:2]
    x = to_input(pad_to(np.stack(images))).to(weights.device())  # (N, 3, H', W'), multiples of 64
    with torch.inference_mode():
        edges = net(x)[:, 0].float().cpu().numpy()  # (N, H', W')
    return [e[:h, :w] for e in edges]


# --- annotators ------------------------------------------------------------------------------

def softedge_pidinet_batch(images: list[np.ndarray], model: str = "") -> list[np.ndarray]:
    return [rgb3(to_map(e)) for e in pidinet_edges(images, "softedge_pidinet", model)]


def softedge_pidisafe_batch(images: list[np.ndarray], model: str = "") -> list[np.ndarray]:
    return [rgb3(to_map(e, safe=True)) for e in pidinet_edges(images, "softedge_pidisafe", model)]


def scribble_pidinet_batch(images: list[np.ndarray], model: str = "") -> list[np.ndarray]:
    return [rgb3(scribble_from(to_map(e))) for e in pidinet_edges(images, "scribble_pidinet", model)]


def softedge_pidinet(image: np.ndarray, model: str = "") -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W, 3) uint8 PiDiNet soft edges."""
    return softedge_pidinet_batch([image], model)[0]


def softedge_pidisafe(image: np.ndarray, model: str = "") -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W, 3) uint8 PiDiNet soft edges quantised to 0, 127, 255."""
    return softedge_pidisafe_batch([image], model)[0]


def scribble_pidinet(image: np.ndarray, model: str = "") -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W, 3) uint8 0 / 255 scribble strokes from PiDiNet edges."""
    return scribble_pidinet_batch([image], model)[0]


ANNOTATORS = {"softedge_pidinet": softedge_pidinet, "softedge_pidisafe": softedge_pidisafe,
              "scribble_pidinet": scribble_pidinet}
PARAMS: dict = {name: {} for name in ANNOTATORS}  # the originals have none (safe is its own annotator)
WEIGHTS = {name: (PIDINET,) for name in ANNOTATORS}
BATCH = {"softedge_pidinet": softedge_pidinet_batch, "softedge_pidisafe": softedge_pidisafe_batch,
         "scribble_pidinet": scribble_pidinet_batch}


def random_pdc_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A ``carv4`` PiDiNet state dict in the pixel-difference layout (``rd`` weights 3x3, as the
    published file), the network's random init (kaiming uniform, as ``nn.Conv2d``), seeded."""
    with torch.random.fork_rng(devices=[]):  # the caller's random state is left alone
        torch.manual_seed(seed)
        state = PiDiNet().state_dict()
        for op, key in zip(PDCS, PDC_KEYS):
            if op == "rd":
                w = torch.empty(*state[key].shape[:2], 3, 3)
                state[key] = nn.init.kaiming_uniform_(w, a=math.sqrt(5))
    return state


def write_random_weights(folder: Path, seed: int = 0) -> None:
    """``folder/table5_pidinet.pth`` in the published layout: ``{"state_dict": {"module." + key: tensor}}``
    of the pixel-difference network, fp32, random init, seeded."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = random_pdc_state(seed)
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, folder / PIDINET.file)

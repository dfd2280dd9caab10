"""Straight lines: M-LSD (``mlsd``, learned) and OpenCV's Line Segment Detector (``lines_lsd``, no weights).

- ``mlsd``: M-LSD large (navervision/mlsd, the PyTorch port in ControlNet v1.1 ``annotator/mlsd``):
  ``MobileV2_MLSD_Large``, a MobileNetV2 trunk (TFLite-style stride-2 padding) with a U-shaped
  decoder; it reads RGB plus a constant channel of ones, all as ``x / 127.5 - 1``, and returns
  9 maps at half size, of which map 0 is the line-centre score (a logit) and 1-4 the
  displacements from each centre to the segment's two ends. Weights ``mlsd_large_512_fp32.pth``
  (a plain state dict: 362 tensors with BatchNorm's running stats and counters, 1,533,680
  parameters), published at https://huggingface.co/lllyasviel/Annotators.
  Decoding (``pred_lines``): sigmoid, 3x3 max-pool non-maximum suppression, the 200 best centres;
  a centre is kept when its score > ``thr_v`` and its segment length (on the half-size map) >
  ``thr_d``; ends = centre + displacement, doubled to image pixels and truncated to integers;
  each segment is drawn white, 1 pixel wide (``cv2.line``), on black. As v1.1 and A1111
  (``pred_lines(img, model, [h, w], ...)``), the network runs at the image's own size (the apps'
  detect resolution, 512 by default), not at M-LSD's training size; like A1111's
  ``resize_image_with_pad`` the image is edge-padded to multiples of 64 first (the network needs
  multiples of 16) and the map cropped back. ``thr_v`` / ``thr_d`` default to 0.1 / 0.1 with
  A1111's slider ranges (0.01-2, 0.01-20).
- ``lines_lsd``: ``cv2.createLineSegmentDetector`` (von Gioi et al.'s LSD, in OpenCV's main
  module again since 4.5.1; present in OpenCV 5.0) on the grey image; segments at least
  ``min_length`` pixels long are drawn the same way as M-LSD's. An LSD segment runs along an edge,
  so a stroke wider than a pixel gives a line along each side of it.

M-LSD's batch norm is in eval mode, so the batched form equals the single-image maps.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import weights
from .lineart_nets import pad64
from .spec import Spec
from .weights import Weights

WEIGHTS: dict[str, tuple[Weights, ...]] = {
    "mlsd": (Weights("mlsd_large_512_fp32.pth", ("lllyasviel/Annotators",),
                     "the M-LSD large line-segment network (MobileV2_MLSD_Large, mlsd_large_512_fp32.pth)"),),
}
TOPK = 200  # centres decoded (pred_lines)
NMS_KERNEL = 3  # max-pool window of the centre map's non-maximum suppression (pred_lines passes 3)


# --- network (module names as in the published state dict) ----------------------------------

class ConvBNReLU(nn.Sequential):
    """Conv, BatchNorm, ReLU6; stride 2 pads one pixel at the bottom / right only (TFLite's "same")."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(nn.Conv2d(cin, cout, kernel, stride, 0 if stride == 2 else (kernel - 1) // 2,
                                   groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))
        self.stride = stride

    def forward(self, x):
        if self.stride == 2:
            x = F.pad(x, (0, 1, 0, 1))
        return super().forward(x)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.residual = stride == 1 and cin == cout
        layers = [ConvBNReLU(cin, hidden, kernel=1)] if expand != 1 else []
        layers += [ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),  # depthwise
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2's first 14 blocks (to 96 channels at / 16); the decoder taps blocks 1, 3, 6, 10, 13."""
    TAPS = (1, 3, 6, 10, 13)

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = [ConvBNReLU(4, 32, stride=2)]  # RGB + the ones channel
        cin = 32
        for expand, cout, n, stride in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1)):
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
                cin = cout
        self.features = nn.Sequential(*layers)

    def forward(self, x):
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.TAPS:
                taps.append(x)
        return taps  # (B, 16, H/2), (B, 24, H/4), (B, 32, H/8), (B, 64, H/16), (B, 96, H/16)


def _conv_bn(cin: int, cout: int, kernel: int, dilation: int = 1, inplace: bool = False) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=dilation * (kernel // 2), dilation=dilation),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=inplace))


class BlockTypeA(nn.Module):
    """1x1 convs on the skip (``a``) and the deeper map (``b``, upsampled x2), concatenated."""

    def __init__(self, in_c1: int, in_c2: int, out_c1: int, out_c2: int, upscale: bool = True):
        super().__init__()
        self.conv1 = _conv_bn(in_c2, out_c2, 1, inplace=True)
        self.conv2 = _conv_bn(in_c1, out_c1, 1, inplace=True)
        self.upscale = upscale

    def forward(self, a, b):
        b = self.conv1(b)
        a = self.conv2(a)
        if self.upscale:
            b = F.interpolate(b, scale_factor=2.0, mode="bilinear", align_corners=True)
        return torch.cat((a, b), dim=1)


class BlockTypeB(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = _conv_bn(cin, cin, 3)
        self.conv2 = _conv_bn(cin, cout, 3)

    def forward(self, x):
        return self.conv2(self.conv1(x) + x)


class BlockTypeC(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = _conv_bn(cin, cin, 3, dilation=5)
        self.conv2 = _conv_bn(cin, cin, 3)
        self.conv3 = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        return self.conv3(self.conv2(self.conv1(x)))


class MobileV2_MLSD_Large(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = MobileNetV2()
        self.block15 = BlockTypeA(64, 96, 64, 64, upscale=False)
        self.block16 = BlockTypeB(128, 64)
        self.block17 = BlockTypeA(32, 64, 64, 64)
        self.block18 = BlockTypeB(128, 64)
        self.block19 = BlockTypeA(24, 64, 64, 64)
        self.block20 = BlockTypeB(128, 64)
        self.block21 = BlockTypeA(16, 64, 64, 64)
        self.block22 = BlockTypeB(128, 64)
        self.block23 = BlockTypeC(64, 16)

    def forward(self, x):  # (B, 4, H, W), H and W multiples of 16 -> (B, 9, H/2, W/2)
        c1, c2, c3, c4, c5 = self.backbone(x)
        x = self.block16(self.block15(c4, c5))
        x = self.block18(self.block17(c3, x))
        x = self.block20(self.block19(c2, x))
        x = self.block22(self.block21(c1, x))
        return self.block23(x)[:, 7:]  # 0: centre logits, 1-4: (x0, y0, x1, y1) displacements


def _load(model: str) -> nn.Module:
    w = WEIGHTS["mlsd"][0]
    path = weights.find("mlsd", w, model)

    def make():
        state = weights.strip_prefix(weights.read_state_dict(path, "mlsd", w.what))
        net = MobileV2_MLSD_Large()
        # BatchNorm's step counters are unused in eval; a file saved without them (older PyTorch) still loads
        if any(k.endswith(".running_mean") for k in state):
            for key, value in net.state_dict().items():
                if key.endswith(".num_batches_tracked") and key not in state:
                    state[key] = value
        return weights.load_strict(net, state, path, "mlsd", w.what).to(weights.device())
    return weights.cached(path, "mlsd_large", make)


# --- decoding and drawing -------------------------------------------------------------------

def decode_lines(tp_map: torch.Tensor, thr_v: float = 0.1, thr_d: float = 0.1, topk: int = TOPK,
                 ksize: int = NMS_KERNEL) -> np.ndarray:
    """(5+, h, w) network output of one image -> (N, 4) float64 segments ``x0, y0, x1, y1`` in
    pixels of the input (twice the map's), as ``pred_lines`` decodes them."""
    h, w = tp_map.shape[-2:]
    heat = torch.sigmoid(tp_map[0:1])  # (1, h, w)
    peak = F.max_pool2d(heat, ksize, stride=1, padding=(ksize - 1) // 2)
    heat = (heat * (peak == heat).float()).reshape(-1)  # only local maxima keep a score
    scores, index = torch.topk(heat, min(topk, heat.numel()))
    ys, xs = (index // w).cpu().numpy(), (index % w).cpu().numpy()
    scores = scores.cpu().numpy()
    disp = tp_map[1:5].permute(1, 2, 0).cpu().numpy()[ys, xs]  # (K, 4) float32: start (dx, dy), end (dx, dy)
    length = np.sqrt(np.sum((disp[:, :2] - disp[:, 2:]) ** 2, axis=-1))
    keep = (scores > thr_v) & (length > thr_d)
    centre = np.stack([xs, ys, xs, ys], axis=1)[keep].astype(np.float64)
    return 2 * (centre + disp[keep].astype(np.float64))  # the map is half the input's size


def draw_lines(segments: np.ndarray, h: int, w: int) -> np.ndarray:
    """(N, 4) ``x0, y0, x1, y1`` -> (h, w, 3) uint8: 1-pixel white lines on black (ends truncated to int)."""
    out = np.zeros((h, w, 3), np.uint8)
    sane = np.isfinite(segments).all(axis=1) & (np.abs(segments) < 2 ** 24).all(axis=1)  # cv2.line takes int32
    for x0, y0, x1, y1 in segments[sane]:
        cv2.line(out, (int(x0), int(y0)), (int(x1), int(y1)), (255, 255, 255), 1)
    return out


def mlsd_batch(images: list[np.ndarray], model: str = "", thr_v: float = 0.1, thr_d: float = 0.1) -> list[np.ndarray]:
    if not images:
        return []
    if len({i.shape for i in images}) > 1:
        raise ValueError(f"annotator 'mlsd': a batch needs images of one size, got {sorted({i.shape for i in images})}")
    net = _load(model)
    h, w = images[0].shape[:2]
    x = np.stack([pad64(i) for i in images])  # (B, Hp, Wp, 3) uint8
    hp, wp = x.shape[1:3]
    with torch.inference_mode():
        t = torch.from_numpy(x).to(weights.device()).float().permute(0, 3, 1, 2).contiguous()
        t = torch.cat([t, torch.ones_like(t[:, :1])], 1) / 127.5 - 1.0  # (B, 4, Hp, Wp); the ones -> -0.992
        maps = net(t)  # (B, 9, Hp/2, Wp/2)
        return [draw_lines(decode_lines(m, thr_v, thr_d), hp, wp)[:h, :w] for m in maps]


def mlsd(image: np.ndarray, model: str = "", thr_v: float = 0.1, thr_d: float = 0.1) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W, 3) uint8: M-LSD's segments, white 1-pixel lines on black."""
    return mlsd_batch([image], model, thr_v, thr_d)[0]


def lines_lsd(image: np.ndarray, min_length: float = 20.0) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W, 3) uint8: OpenCV LSD's segments at least ``min_length`` pixels
    long, white 1-pixel lines on black. No weights."""
    h, w = image.shape[:2]
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    found = cv2.createLineSegmentDetector().detect(grey)[0]  # (N, 1, 4) float32 or None
    segments = np.zeros((0, 4)) if found is None else found.reshape(-1, 4).astype(np.float64)
    length = np.hypot(segments[:, 2] - segments[:, 0], segments[:, 3] - segments[:, 1])
    return draw_lines(segments[length >= min_length], h, w)


ANNOTATORS = {"mlsd": mlsd, "lines_lsd": lines_lsd}
PARAMS = {
    "mlsd": {"thr_v": Spec(float, 0.01, 2.0), "thr_d": Spec(float, 0.01, 20.0)},  # A1111's sliders
    "lines_lsd": {"min_length": Spec(float, 0, 4096)},
}
BATCH = {"mlsd": mlsd_batch}


def write_random_weights(folder: Path, seed: int = 0) -> None:
    """``mlsd_large_512_fp32.pth`` (a plain state dict of the full network, randomly initialised,
    seeded) in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.save(MobileV2_MLSD_Large().state_dict(), folder / "mlsd_large_512_fp32.pth")

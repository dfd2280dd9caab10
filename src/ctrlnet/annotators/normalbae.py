"""NormalBAE surface normals (``normal_bae``): Bae et al., "Estimating and Exploiting the Aleatoric
Uncertainty in Surface Normal Estimation" (ICCV 2021, https://github.com/baegwangbin/surface_normal_uncertainty),
the ControlNet v1.1 normal-map annotator.

Weights: ``scannet.pt`` from https://huggingface.co/lllyasviel/Annotators (the authors' ScanNet
model): ``{"model": state_dict, "iter": ...}``, keys ``module.encoder.original_model.*`` and
``module.decoder.*`` (the authors' ``train.py`` saves the DataParallel-wrapped model; files without
``module.`` load too, as with the reference's ``load_checkpoint``), fp32, 936 tensors, 72,422,336
parameters.

Network (``NNET``): an EfficientNet-B5 encoder written here with the module names of
gen-efficientnet-pytorch's ``tf_efficientnet_b5_ap`` (``conv_stem``, ``bn1``,
``blocks.i.j.conv_dw`` / ``se.conv_reduce`` / ``conv_pwl`` ..., ``conv_head``, ``bn2``; TF "SAME"
padding, BN eps 1e-3, swish), which the reference builds with ``torch.hub``; and the decoder of
``annotator/normalbae/models/submodules/decoder.py``: a U-Net to 1/2 resolution, a 1/8 prediction
(x, y, z, kappa), then refinement at 1/4, 1/2 and 1/1 by per-pixel MLPs (``Conv1d`` k=1) over the
upsampled features and the upsampled previous prediction. Training samples uncertain pixels for
those MLPs; at inference the reference's ``mode='test'`` runs them on every pixel, so the output is
deterministic (the sampling is not used).

Pre/post-processing (ControlNet v1.1 ``annotator/normalbae/__init__.py``, identical in the A1111
extension's ``normal_bae``): RGB / 255, ImageNet mean/std; the full-resolution prediction's
(x, y, z) -> ``((n + 1) * 0.5).clip(0, 1) * 255`` cast to uint8 (truncated), R = x, G = y, B = z
with no channel flips (those belong to the MiDaS and DSINE normal maps, not this one). The A1111
extension pads the resized image to a multiple of 64 with its edge pixels and crops the map back
(``resize_image_with_pad``); so does this module, at the size it is given.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import weights
from .weights import Weights

WEIGHTS = {"normal_bae": (Weights("scannet.pt", ("lllyasviel/Annotators",),
                                  "the NormalBAE surface-normal network (EfficientNet-B5 + uncertainty decoder)"),)}
PARAMS: dict = {"normal_bae": {}}  # A1111 has no sliders for it beyond the resolution

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PAD = 64  # the A1111 extension pads to a multiple of 64 (the network needs one of 8)
BN_EPS = 1e-3  # TF's BatchNorm epsilon, which the tf_ EfficientNets keep
CHUNK = 1 << 18  # pixels per refinement-MLP call: bounds the (B, 128, N) intermediates at large sizes
# (up to 512 x 512 one call, as the reference; beyond it the sums differ at float rounding, ~3e-7)


# --- EfficientNet-B5 (gen-efficientnet-pytorch ``tf_efficientnet_b5_ap``) ---------------------

def make_divisible(v: float, divisor: int = 8) -> int:
    """Channels rounded to ``divisor``, never more than 10% down (gen-efficientnet's rule)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class Conv2dSame(nn.Conv2d):
    """TF "SAME" convolution for strided layers: pads (k - 1 + (ceil(i / s) - 1) s + 1 - i),
    the odd pixel at the bottom/right, as TensorFlow does (stride-1 odd kernels use plain
    symmetric padding, which is the same thing)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(x.shape[-2:], self.kernel_size, self.stride):
            pad = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads.append((pad // 2, pad - pad // 2))
        x = F.pad(x, [*pads[1], *pads[0]])  # (left, right, top, bottom)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def conv(cin: int, cout: int, k: int, stride: int = 1, depthwise: bool = False) -> nn.Conv2d:
    groups = cout if depthwise else 1
    if stride > 1:
        return Conv2dSame(cin, cout, k, stride, groups=groups, bias=False)
    return nn.Conv2d(cin, cout, k, stride, padding=k // 2, groups=groups, bias=False)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced, 1)
        self.conv_expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)  # (B, C, 1, 1)
        return x * torch.sigmoid(self.conv_expand(F.silu(self.conv_reduce(s))))


class DepthwiseSeparableConv(nn.Module):
    """Stage 0 (expansion 1): depthwise conv, SE, pointwise projection."""

    def __init__(self, cin: int, cout: int, k: int, stride: int):
        super().__init__()
        self.residual = stride == 1 and cin == cout
        self.conv_dw = conv(cin, cin, k, stride, depthwise=True)
        self.bn1 = nn.BatchNorm2d(cin, eps=BN_EPS)
        self.se = SqueezeExcite(cin, make_divisible(cin * 0.25, 1))
        self.conv_pw = conv(cin, cout, 1)
        self.bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv_pw(self.se(F.silu(self.bn1(self.conv_dw(x))))))
        return y + x if self.residual else y


class InvertedResidual(nn.Module):
    """MBConv: pointwise expansion x6, depthwise conv, SE (reduced from the block's input
    channels), linear pointwise projection."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int = 6):
        super().__init__()
        mid = make_divisible(cin * expand)
        self.residual = stride == 1 and cin == cout
        self.conv_pw = conv(cin, mid, 1)
        self.bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self.conv_dw = conv(mid, mid, k, stride, depthwise=True)
        self.bn2 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self.se = SqueezeExcite(mid, make_divisible(cin * 0.25, 1))
        self.conv_pwl = conv(mid, cout, 1)
        self.bn3 = nn.BatchNorm2d(cout, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.silu(self.bn1(self.conv_pw(x)))
        y = self.se(F.silu(self.bn2(self.conv_dw(y))))
        y = self.bn3(self.conv_pwl(y))
        return y + x if self.residual else y


# EfficientNet-B0's stages (kernel, stride, expansion, channels, repeats), scaled for B5 by
# width 1.6 and depth 2.2 (repeats rounded up): 48-channel stem, 3/5/5/7/7/9/3 blocks, 2048 head.
B0_STAGES = ((3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
             (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1))
WIDTH, DEPTH = 1.6, 2.2


class EfficientNetB5(nn.Module):
    """The trunk without pooling and classifier (the reference replaces them with Identity)."""

    def __init__(self):
        super().__init__()
        stem = make_divisible(32 * WIDTH)
        self.conv_stem = conv(3, stem, 3, stride=2)
        self.bn1 = nn.BatchNorm2d(stem, eps=BN_EPS)
        stages, cin = [], stem
        for k, stride, expand, channels, repeats in B0_STAGES:
            cout = make_divisible(channels * WIDTH)
            blocks = []
            for i in range(math.ceil(repeats * DEPTH)):
                block = DepthwiseSeparableConv if expand == 1 else InvertedResidual
                args = (cin, cout, k, stride if i == 0 else 1) + (() if expand == 1 else (expand,))
                blocks.append(block(*args))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.conv_head = conv(cin, make_divisible(1280 * WIDTH), 1)
        self.bn2 = nn.BatchNorm2d(make_divisible(1280 * WIDTH), eps=BN_EPS)  # in the file; its output is unused

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The decoder's skips: stages 0, 1, 2, 4 and the head conv (before ``bn2``), i.e. the
        reference encoder's ``features[4, 5, 6, 8, 11]``."""
        x = F.silu(self.bn1(self.conv_stem(x)))
        skips = []
        for i, stage in enumerate(self.blocks):
            x = stage(x)
            if i in (0, 1, 2, 4):
                skips.append(x)  # (B, 24, H/2), (B, 40, H/4), (B, 64, H/8), (B, 176, H/16)
        return skips + [self.conv_head(x)]  # + (B, 2048, H/32, W/32)


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.original_model = EfficientNetB5()  # the reference's attribute name (key prefix)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.original_model(x)


# --- decoder (annotator/normalbae/models/submodules) -------------------------------------------

class UpSampleBN(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self._net = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.LeakyReLU(),
                                  nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.LeakyReLU())

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=True)
        return self._net(torch.cat([up, skip], dim=1))


def norm_normalize(out: torch.Tensor) -> torch.Tensor:
    """(B, 4, ...) -> unit normal (x, y, z) and concentration kappa = elu + 1 + 0.01."""
    x, y, z, kappa = torch.split(out, 1, dim=1)
    norm = torch.sqrt(x ** 2 + y ** 2 + z ** 2) + 1e-10
    return torch.cat([x / norm, y / norm, z / norm, F.elu(kappa) + 1.0 + 0.01], dim=1)


def mlp_head(cin: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(cin, 128, 1), nn.ReLU(), nn.Conv1d(128, 128, 1), nn.ReLU(),
                         nn.Conv1d(128, 128, 1), nn.ReLU(), nn.Conv1d(128, 4, 1))


class Decoder(nn.Module):
    """``architecture='BN'``; the inference path (``mode='test'``) only."""

    def __init__(self):
        super().__init__()
        self.conv2 = nn.Conv2d(2048, 2048, 1)
        self.up1 = UpSampleBN(2048 + 176, 1024)
        self.up2 = UpSampleBN(1024 + 64, 512)
        self.up3 = UpSampleBN(512 + 40, 256)
        self.up4 = UpSampleBN(256 + 24, 128)
        self.out_conv_res8 = nn.Conv2d(512, 4, 3, padding=1)
        self.out_conv_res4 = mlp_head(512 + 4)
        self.out_conv_res2 = mlp_head(256 + 4)
        self.out_conv_res1 = mlp_head(128 + 4)

    @staticmethod
    def refine(feat: torch.Tensor, coarse: torch.Tensor, head: nn.Sequential) -> torch.Tensor:
        """The prediction at twice ``coarse``'s resolution: ``head`` on every pixel of the
        upsampled features and upsampled coarse prediction (the reference's test mode)."""
        feat = F.interpolate(feat, scale_factor=2, mode="bilinear", align_corners=True)
        init = F.interpolate(coarse, scale_factor=2, mode="bilinear", align_corners=True)
        x = torch.cat([feat, init], dim=1)  # (B, C + 4, H, W)
        b, c, h, w = x.shape
        x = x.view(b, c, h * w)  # (B, C + 4, N)
        out = torch.cat([head(x[:, :, i:i + CHUNK]) for i in range(0, h * w, CHUNK)], dim=2)  # (B, 4, N)
        return norm_normalize(out).view(b, 4, h, w)

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor:
        s2, s4, s8, s16, s32 = skips
        x_d0 = self.conv2(s32)  # (B, 2048, H/32, W/32)
        x_d1 = self.up1(x_d0, s16)  # (B, 1024, H/16, W/16)
        x_d2 = self.up2(x_d1, s8)  # (B, 512, H/8, W/8)
        x_d3 = self.up3(x_d2, s4)  # (B, 256, H/4, W/4)
        x_d4 = self.up4(x_d3, s2)  # (B, 128, H/2, W/2)
        out8 = norm_normalize(self.out_conv_res8(x_d2))  # (B, 4, H/8, W/8)
        out4 = self.refine(x_d2, out8, self.out_conv_res4)  # (B, 4, H/4, W/4)
        out2 = self.refine(x_d3, out4, self.out_conv_res2)  # (B, 4, H/2, W/2)
        return self.refine(x_d4, out2, self.out_conv_res1)  # (B, 4, H, W)


class NNET(nn.Module):
    """Encoder + decoder; returns the full-resolution (B, 4, H, W) prediction: unit normal, kappa."""

    def __init__(self):
        super().__init__()
        self.encoder = Encoder()
        self.decoder = Decoder()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


# --- loading and running -----------------------------------------------------------------------

def load(model: str = "") -> NNET:
    path = weights.find("normal_bae", WEIGHTS["normal_bae"][0], model)
    what = WEIGHTS["normal_bae"][0].what

    def build() -> NNET:
        state = weights.strip_prefix(weights.read_state_dict(path, "normal_bae", what))
        net = weights.load_strict(NNET(), state, path, "normal_bae", what)
        return net.to(weights.device(), torch.float32)
    return weights.cached(path, "normal_bae", build)


def normal_maps(images: list[np.ndarray], model: str = "") -> list[np.ndarray]:
    """(H, W, 3) uint8 normal maps of same-size (H, W, 3) uint8 RGB ``images``, one forward pass."""
    net = load(model)
    h, w = images[0].shape[:2]
    ph, pw = -h % PAD, -w % PAD
    batch = np.stack([np.pad(i, ((0, ph), (0, pw), (0, 0)), mode="edge") for i in images])  # (B, H', W', 3)
    device = weights.device()
    with torch.inference_mode():
        x = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H', W')
        mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
        normal = net((x - mean) / std)[:, :3, :h, :w]  # (B, 3, H, W), unit vectors
        normal = ((normal + 1) * 0.5).clip(0, 1)
        # * 255 then a uint8 cast that truncates, as the reference (127.5 -> 127)
        out = (normal.permute(0, 2, 3, 1).cpu().numpy() * 255.0).clip(0, 255).astype(np.uint8)  # (B, H, W, 3)
    return list(out)


def normal_bae(image: np.ndarray, model: str = "") -> np.ndarray:
    """NormalBAE surface normals of (H, W, 3) uint8 RGB ``image``: (H, W, 3) uint8, R/G/B = x/y/z."""
    return normal_maps([image], model)[0]


ANNOTATORS = {"normal_bae": normal_bae}
BATCH = {"normal_bae": normal_maps}


def init_goog(net: nn.Module) -> None:
    """gen-efficientnet's ("goog", TF) initialisation of its trunk: conv weights ~ N(0, 2 / fan_out)
    per group, biases 0; BatchNorm weight 1, bias 0."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def write_random_weights(folder: Path, seed: int = 0) -> None:
    """``folder/scannet.pt``: the full-size network with its random initialisation (the encoder's
    as gen-efficientnet makes it, the decoder's PyTorch default), seeded, in the published layout
    (``{"model": state_dict with "module." keys, "iter": ...}``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = NNET()
        init_goog(net.encoder)
    state = {"module." + k: v for k, v in net.state_dict().items()}
    torch.save({"model": state, "iter": 0}, folder / "scannet.pt")

"""Learned line art: ControlNet 1.1's ``lineart_realistic`` / ``lineart_coarse`` and ``lineart_anime``.

- ``lineart_realistic`` / ``lineart_coarse``: the informative-drawings ``Generator`` (carolineec/
  informative-drawings; ControlNet v1.1 ``annotator/lineart``): a 7x7 stem, two stride-2 convs,
  3 residual blocks, two transposed convs, a 7x7 head and a sigmoid, instance norm throughout.
  Weights ``sk_model.pth`` (realistic) and ``sk_model2.pth`` (coarse), plain state dicts
  (24 tensors, 4,290,945 parameters), published at https://huggingface.co/lllyasviel/Annotators.
  Input RGB / 255; output ``uint8(clip(255 y))``.
- ``lineart_anime``: the Anime2Sketch pix2pix U-Net (Mukosame/Anime2Sketch; ControlNet v1.1
  ``annotator/lineart_anime``): 8 down / up levels, 64 base filters, instance norm without
  affine, tanh. Weights ``netG.pth`` (a DataParallel state dict: every key starts ``module.``;
  32 tensors, 54,405,505 parameters), same repository. The image is resized (bicubic) to the next
  multiples of 256 (eight halvings down to 1 x 1 at the bottleneck), fed as RGB / 127.5 - 1, and
  ``127.5 y + 127.5`` is resized back (bicubic), clipped and truncated to uint8.

The networks draw dark lines on white; the ControlNet line-art models read white lines on black,
so, as the A1111 extension (``scripts/preprocessor/legacy/processor.py``: "applied auto
inversion", ``255 - detector(img)``) and the v1.1 gradio apps (``control = 1 - map / 255``) do,
the map is inverted: white lines on black, (H, W, 3) uint8. As A1111's
``resize_image_with_pad``, the image is edge-padded to multiples of 64 before the network (at
A1111's / v1.1's detect resolutions it already is one: nothing changes) and the map cropped back.

Instance norm works per image, so the batched forms (several same-size images per forward pass)
give the single-image maps.
"""

from __future__ import annotations

import functools
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from . import weights
from .weights import Weights

REPO = ("lllyasviel/Annotators",)
WEIGHTS: dict[str, tuple[Weights, ...]] = {
    "lineart_realistic": (Weights("sk_model.pth", REPO, "the ControlNet 1.1 realistic line-art network "
                                  "(informative-drawings Generator, sk_model.pth)"),),
    "lineart_coarse": (Weights("sk_model2.pth", REPO, "the ControlNet 1.1 coarse line-art network "
                               "(informative-drawings Generator, sk_model2.pth)"),),
    "lineart_anime": (Weights("netG.pth", REPO, "the ControlNet 1.1 anime line-art network "
                              "(Anime2Sketch U-Net, netG.pth)"),),
}


# --- networks (module names as in the published state dicts) -------------------------------

class ResidualBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), nn.InstanceNorm2d(c), nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), nn.InstanceNorm2d(c))

    def forward(self, x):
        return x + self.conv_block(x)


class Generator(nn.Module):
    """informative-drawings' generator as ControlNet 1.1 builds it: ``Generator(3, 1, 3)``."""

    def __init__(self, input_nc: int = 3, output_nc: int = 1, n_residual_blocks: int = 3):
        super().__init__()
        norm = nn.InstanceNorm2d  # affine=False: no weights
        self.model0 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(input_nc, 64, 7), norm(64), nn.ReLU(inplace=True))
        self.model1 = nn.Sequential(  # 64 -> 128 -> 256 channels, / 4 in size
            nn.Conv2d(64, 128, 3, stride=2, padding=1), norm(128), nn.ReLU(inplace=True),
            nn.Conv2d(128, 256, 3, stride=2, padding=1), norm(256), nn.ReLU(inplace=True))
        self.model2 = nn.Sequential(*[ResidualBlock(256) for _ in range(n_residual_blocks)])
        self.model3 = nn.Sequential(  # back to full size
            nn.ConvTranspose2d(256, 128, 3, stride=2, padding=1, output_padding=1), norm(128), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(128, 64, 3, stride=2, padding=1, output_padding=1), norm(64), nn.ReLU(inplace=True))
        self.model4 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(64, output_nc, 7), nn.Sigmoid())

    def forward(self, x):  # (B, 3, H, W) in [0, 1], H and W multiples of 4 -> (B, 1, H, W) in [0, 1]
        return self.model4(self.model3(self.model2(self.model1(self.model0(x)))))


class UnetBlock(nn.Module):
    """One level of the pix2pix U-Net (``UnetSkipConnectionBlock``): down, ``inner``, up, and
    (except the outermost) the input concatenated to the result. Instance norm means every conv
    has a bias; ``model`` holds the layers at the indices of the published keys."""

    def __init__(self, outer: int, inner_nc: int, input_nc: int | None = None, inner: nn.Module | None = None,
                 outermost: bool = False):
        super().__init__()
        self.outermost = outermost
        norm = functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)
        down = nn.Conv2d(input_nc or outer, inner_nc, 4, stride=2, padding=1)
        if outermost:
            layers = [down, inner, nn.ReLU(True), nn.ConvTranspose2d(inner_nc * 2, outer, 4, stride=2, padding=1),
                      nn.Tanh()]
        elif inner is None:  # innermost: 1 x 1 at a 256 input, no norm on the way down
            layers = [nn.LeakyReLU(0.2, True), down, nn.ReLU(True),
                      nn.ConvTranspose2d(inner_nc, outer, 4, stride=2, padding=1), norm(outer)]
        else:
            layers = [nn.LeakyReLU(0.2, True), down, norm(inner_nc), inner, nn.ReLU(True),
                      nn.ConvTranspose2d(inner_nc * 2, outer, 4, stride=2, padding=1), norm(outer)]
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x) if self.outermost else torch.cat([x, self.model(x)], 1)


class UnetGenerator(nn.Module):
    """Anime2Sketch's generator: ``UnetGenerator(3, 1, 8, 64)`` with affine-free instance norm."""

    def __init__(self, input_nc: int = 3, output_nc: int = 1, num_downs: int = 8, ngf: int = 64):
        super().__init__()
        block = UnetBlock(ngf * 8, ngf * 8)  # innermost
        for _ in range(num_downs - 5):
            block = UnetBlock(ngf * 8, ngf * 8, inner=block)
        for mult in (4, 2, 1):  # 512 -> 256 -> 128 -> 64 filters
            block = UnetBlock(ngf * mult, ngf * mult * 2, inner=block)
        self.model = UnetBlock(output_nc, ngf, input_nc=input_nc, inner=block, outermost=True)

    def forward(self, x):  # (B, 3, H, W) in [-1, 1], H and W multiples of 256 -> (B, 1, H, W) in [-1, 1]
        return self.model(x)


# --- loading --------------------------------------------------------------------------------

def _load(name: str, model: str, kind: str, build) -> nn.Module:
    w = WEIGHTS[name][0]
    path = weights.find(name, w, model)

    def make():
        state = weights.strip_prefix(weights.read_state_dict(path, name, w.what))  # netG.pth: "module."
        return weights.load_strict(build(), state, path, name, w.what).to(weights.device())
    return weights.cached(path, kind, make)


def pad64(image: np.ndarray) -> np.ndarray:
    """(H, W, C) edge-padded at the bottom / right to multiples of 64 (A1111's ``resize_image_with_pad``)."""
    h, w = image.shape[:2]
    return np.pad(image, [[0, -h % 64], [0, -w % 64], [0, 0]], mode="edge")


def _rgb_map(lines: np.ndarray, h: int, w: int) -> np.ndarray:
    """(Hp, Wp) uint8 dark-on-white -> (h, w, 3) uint8 white lines on black (A1111's inversion)."""
    out = 255 - lines[:h, :w]
    return np.repeat(out[:, :, None], 3, axis=2)


def _same_size(images: list[np.ndarray], name: str) -> None:
    if len({i.shape for i in images}) > 1:
        raise ValueError(f"annotator {name!r}: a batch needs images of one size, got "
                         f"{sorted({i.shape for i in images})}")


def _realistic_batch(images: list[np.ndarray], model: str, name: str) -> list[np.ndarray]:
    if not images:
        return []
    _same_size(images, name)
    net = _load(name, model, "lineart_generator", Generator)
    h, w = images[0].shape[:2]
    x = np.stack([pad64(i) for i in images])  # (B, Hp, Wp, 3) uint8
    with torch.inference_mode():
        t = torch.from_numpy(x).to(weights.device()).float().permute(0, 3, 1, 2).contiguous() / 255.0  # (B, 3, Hp, Wp)
        y = net(t)[:, 0].cpu().numpy()  # (B, Hp, Wp) in [0, 1], dark lines
    lines = (y * 255.0).clip(0, 255).astype(np.uint8)
    return [_rgb_map(m, h, w) for m in lines]


def lineart_realistic_batch(images: list[np.ndarray], model: str = "") -> list[np.ndarray]:
    return _realistic_batch(images, model, "lineart_realistic")


def lineart_coarse_batch(images: list[np.ndarray], model: str = "") -> list[np.ndarray]:
    return _realistic_batch(images, model, "lineart_coarse")


def lineart_realistic(image: np.ndarray, model: str = "") -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W, 3) uint8 white lines on black (``sk_model.pth``)."""
    return lineart_realistic_batch([image], model)[0]


def lineart_coarse(image: np.ndarray, model: str = "") -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W, 3) uint8 white lines on black, coarser (``sk_model2.pth``)."""
    return lineart_coarse_batch([image], model)[0]


def lineart_anime_batch(images: list[np.ndarray], model: str = "") -> list[np.ndarray]:
    if not images:
        return []
    _same_size(images, "lineart_anime")
    net = _load("lineart_anime", model, "lineart_anime_unet", UnetGenerator)
    h, w = images[0].shape[:2]
    padded = [pad64(i) for i in images]
    hp, wp = padded[0].shape[:2]
    hn, wn = 256 * -(-hp // 256), 256 * -(-wp // 256)  # eight halvings: multiples of 256
    x = np.stack([cv2.resize(p, (wn, hn), interpolation=cv2.INTER_CUBIC) for p in padded])  # (B, Hn, Wn, 3)
    with torch.inference_mode():
        t = torch.from_numpy(x).to(weights.device()).float().permute(0, 3, 1, 2).contiguous() / 127.5 - 1.0
        y = (net(t)[:, 0] * 127.5 + 127.5).cpu().numpy()  # (B, Hn, Wn) float, dark lines on white
    out = []
    for m in y:
        m = cv2.resize(m, (wp, hp), interpolation=cv2.INTER_CUBIC)
        out.append(_rgb_map(m.clip(0, 255).astype(np.uint8), h, w))
    return out


def lineart_anime(image: np.ndarray, model: str = "") -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W, 3) uint8 white lines on black (``netG.pth``, Anime2Sketch)."""
    return lineart_anime_batch([image], model)[0]


ANNOTATORS = {"lineart_realistic": lineart_realistic, "lineart_coarse": lineart_coarse,
              "lineart_anime": lineart_anime}
PARAMS: dict = {"lineart_realistic": {}, "lineart_coarse": {}, "lineart_anime": {}}
BATCH = {"lineart_realistic": lineart_realistic_batch, "lineart_coarse": lineart_coarse_batch,
         "lineart_anime": lineart_anime_batch}


def write_random_weights(folder: Path, seed: int = 0) -> None:
    """``sk_model.pth``, ``sk_model2.pth`` (plain state dicts) and ``netG.pth`` (keys prefixed
    ``module.``, as published) of the full-size networks, randomly initialised (seeded), in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for file in ("sk_model.pth", "sk_model2.pth"):
            torch.save(Generator().state_dict(), folder / file)
        state = UnetGenerator().state_dict()
        torch.save({"module." + k: v for k, v in state.items()}, folder / "netG.pth")

"""Generation under control: a prompt plus one or more condition images in, images out.

    from ctrlnet import Pipeline, Control
    pipe = Pipeline.from_pretrained("nano", controlnets=["nano-canny"])
    result = pipe("a red circle on a white background",
                  controls=[Control("nano-canny", image="edges.png", scale=1.0, end=0.8)], seed=0)
    result.images[0].save("out.png")          # PIL images, "parameters" in result.parameters[i]

``Pipeline.__call__`` follows diffusers' numbered steps; the loop itself is ``sampling.denoise``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from diffusers import T2IAdapter
from PIL import Image

import torch._inductor.config as inductor_config
from tqdm.auto import tqdm

from ..annotators import condition_for, get_annotator, require
from ..base import LockedBase, load_base
from ..formats import kind_name, load_control
from ..models.adapter import adapter_problems
from ..models.control_lora import ControlLoRA
from ..images import RESIZE_MODES, as_rgb, resize_plain, resize_to, round_size
from ..models.controlnet import ControlNet
from ..names import NANO, is_nano
from ..prepack import PackedWeights
from ..prepack import available as packing_available
from .sampling import (ActiveAdapter, ActiveControl, Inpainting, RegionBatch, check_control, decode, default_guidance,
                       denoise, encode_image, initial_noise)
from .openvino import OpenVINOBackend
from .ranges import MAX_SIDE, check_args, resolve_seed
from .schedulers import make_scheduler, sampler_label
from .text import encode_text, guidance_text, warn_long_prompts

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BACKENDS = ("torch", "openvino")


class SlowDtypeWarning(UserWarning):
    """A dtype this device computes far slower than fp32 (fp16 on a CPU, emulated bf16)."""


@dataclass
class Control:
    """One control unit: which net, which image, how it is turned into a condition, how strongly it acts.

    ``model``: a bundled name (``nano-canny``), a diffusers folder, an original file, or a loaded
    ``ControlNet``. ``image``: a path, PIL image or (H, W[, C]) uint8 array - a ready condition map,
    or a photo when ``annotator`` names the detector to run on it first - used for every prompt; or
    a list with one such image per prompt. ``annotator="inpaint"``
    makes the inpaint ControlNet's condition from the init image and the mask (masked pixels -1).
    ``scale``: one float or one per residual, each in [0, 10]. ``start``/``end``: the fraction of
    steps where it acts, in [0, 1]. ``mode``: balanced | prompt | control (see ``sampling``).
    ``every``: run the net at every k-th of its steps and reuse its last residuals in between
    (ControlNet reuse; 1 = every step).

    ``model`` may be any kind (``formats.kinds``): a ControlNet, a Union ControlNet, a Control-LoRA
    (built on this pipeline's base) or a T2I-Adapter (its features computed once; ``scale`` one float,
    ``mode`` balanced or control). A Union net takes ``type``: the condition type of ``image``
    (``canny``, ``depth``, an alias such as ``lineart``, or an index), or a list of types with a list
    of images, one per type (and ``annotator`` one name or one per type): several conditions through
    one pass of its trunk.
    """

    model: Any
    image: Any = None
    annotator: str = ""
    annotator_params: dict = field(default_factory=dict)
    scale: float | Sequence[float] = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: str = "balanced"
    resize_mode: str = "crop_and_resize"
    every: int = 1
    type: str | int | Sequence[str | int] = ""  # Union ControlNets: the condition type(s)

    @property
    def types(self) -> list:
        """The Union condition types, one per image ([] when none given)."""
        if isinstance(self.type, (list, tuple)):
            return list(self.type)
        return [self.type] if self.type != "" else []

    @property
    def multi(self) -> bool:
        """Several (image, type) pairs in this one unit (a Union net)."""
        return isinstance(self.type, (list, tuple))

    def pairs(self) -> list["Control"]:
        """One single-type Control per (image, type) pair of a multi-type unit."""
        n = len(self.types)
        annotators = self.annotator if isinstance(self.annotator, (list, tuple)) else [self.annotator] * n
        return [dataclasses.replace(self, image=im, type=t, annotator=a)
                for im, t, a in zip(self.image, self.types, annotators)]

    def check(self) -> None:
        """Every rule a control unit obeys, for the CLI, the Python API and the server alike."""
        where = f"control {self.model}"
        if self.multi:
            n = len(self.types)
            if not isinstance(self.image, (list, tuple)) or len(self.image) != n or n == 0:
                raise ValueError(f"{where}: {n} types need {n} images, one per type (image=[...], type=[...])")
            if isinstance(self.annotator, (list, tuple)):
                if len(self.annotator) != n:
                    raise ValueError(f"{where}: {len(self.annotator)} annotators for {n} types; give one or one per "
                                     "type")
                if self.annotator_params:
                    raise ValueError(f"{where}: annotator parameters with one annotator per type are ambiguous; "
                                     "run the annotators first and pass their maps")
            for pair in self.pairs():
                pair.check()
            return
        check_control(self.mode, self.start, self.end, where, self.scale, self.every)
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"{where}: resize mode {self.resize_mode!r} is not one of {', '.join(RESIZE_MODES)}")
        if self.image is None and self.annotator != "inpaint":
            raise ValueError(f"{where}: no image given")
        if self.annotator and self.annotator != "inpaint":
            get_annotator(self.annotator, **self.annotator_params)  # unknown names/parameters fail here, early
            require(self.annotator, self.annotator_params)  # its weights / package: before the base loads
        elif self.annotator_params:  # they would be ignored: say so instead
            raise ValueError(f"{where}: annotator parameters {sorted(self.annotator_params)} given but no annotator "
                             "(add annotator=NAME)")

    @property
    def per_prompt(self) -> bool:
        """One image per prompt (a list) rather than one image for all (a multi-type unit's list is
        one image per type)."""
        return isinstance(self.image, (list, tuple)) and not self.multi


@dataclass
class Region:
    """Regional prompting: inside ``mask`` the conditional noise prediction comes from ``prompt``
    instead of the main prompt ("latent couple"; A1111's Regional Prompter / Latent Couple, ComfyUI's
    masked conditioning). ``mask``: a path, PIL image or (H, W[, C]) array, resized to the output
    size by ``resize_mode`` (as a control's image: give the same mode as the controls); white =
    inside, grey = partly (averaged down to the latent grid, so edges blend).
    The ControlNets act on each region's rows as on the main prompt's. Cost: one more UNet and
    ControlNet batch per region per step. Typical use: one object per region, to bind attributes
    ("a red circle" here, "a blue square" there) that a single prompt mixes up."""

    prompt: str
    mask: Any
    resize_mode: str = "crop_and_resize"


@dataclass
class Result:
    images: list[Image.Image]
    # the condition maps actually used, (H, W, 3) uint8, one per control (a list of them, one per
    # prompt, for a control given one image per prompt; a tuple, one per type, for a multi-type Union unit)
    conditions: list
    parameters: list[str]  # A1111-style "parameters" text of each image
    latents: torch.Tensor | None = None  # (B, C, h, w) final latents
    num_images: int = 1  # per prompt: image i belongs to prompt i // num_images
    seeds: list[int] = field(default_factory=list)  # image i's seed (the one drawn when seed=-1), as in its parameters


def openvino_backend(backend: str | OpenVINOBackend, dtype: torch.dtype, packed_weights,
                     compile) -> OpenVINOBackend | None:
    """The OpenVINO backend ``backend`` asks for (None for torch), after the checks both ``Pipeline``
    constructors make: a known name, a dtype that agrees with a given backend's precision, no
    options it has no use for."""
    if not isinstance(backend, OpenVINOBackend) and backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return None
    refuse_with_openvino(packed_weights, compile)
    if isinstance(backend, OpenVINOBackend):
        if dtype not in (torch.float32, backend.precision):
            raise ValueError(f"dtype {dtype} with an OpenVINOBackend of precision {backend.precision}: the "
                             "backend's precision applies; leave dtype at fp32 or make them equal")
        return backend
    return OpenVINOBackend(dtype)


def refuse_with_openvino(packed_weights, compile) -> None:
    """Options the OpenVINO backend has no use for: a clear error naming the one given."""
    if packed_weights is not None and packed_weights is not False:
        raise ValueError("backend openvino: packed_weights does not apply (OpenVINO packs its own weights); "
                         "leave it unset or use backend torch")
    if isinstance(compile, dict) or compile:
        raise ValueError("backend openvino: compile (--compile) does not apply (OpenVINO compiles its own "
                         "kernels); drop it or use backend torch")


def cpu_has_native_bf16() -> bool:
    """True when the CPU flags list AVX512-BF16 or AMX-BF16 (Linux); True when they cannot be read."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    return "avx512_bf16" in flags or "amx_bf16" in flags


def check_compatible(net: ControlNet | T2IAdapter, base: LockedBase, name: str) -> None:
    """A clear error when a control network was made for another base architecture."""
    if isinstance(net, T2IAdapter):
        problems = adapter_problems(net, dict(base.unet.config))
        if problems:
            raise ValueError(f"T2I-Adapter {name} does not fit the base {base.source} ({base.kind}): "
                             + "; ".join(problems) + ". Use an adapter trained for this base family.")
        return
    nc, uc = net.config, base.unet.config
    problems = []
    if nc.cross_attention_dim != uc.cross_attention_dim:
        problems.append(f"cross-attention width {nc.cross_attention_dim} vs the base's {uc.cross_attention_dim}")
    if tuple(nc.block_out_channels) != tuple(uc.block_out_channels):
        problems.append(f"channels {tuple(nc.block_out_channels)} vs the base's {tuple(uc.block_out_channels)}")
    latent_channels = 4 if uc.in_channels == 9 else uc.in_channels  # a 9-channel inpainting UNet takes 4-channel nets
    if nc.in_channels != latent_channels:
        problems.append(f"{nc.in_channels} latent channels vs the base's {uc.in_channels}")
    if (nc.addition_embed_type or None) != (uc.get("addition_embed_type") or None):
        problems.append(f"added embedding {nc.addition_embed_type} vs the base's {uc.get('addition_embed_type')}")
    if problems:
        raise ValueError(f"ControlNet {name} does not fit the base {base.source} ({base.kind}): "
                         + "; ".join(problems) + ". Use a ControlNet trained for this base family.")


class Pipeline:
    """A locked base plus ControlNets, loaded once; call it to generate."""

    def __init__(self, base: LockedBase, controlnets: dict[str, ControlNet] | None = None,
                 dtype: torch.dtype = torch.float32, name: str = "", channels_last: bool = False,
                 packed_weights: bool | PackedWeights | None = None, compile: bool | dict = False,
                 backend: str | OpenVINOBackend = "torch"):
        """``channels_last``: convolution weights of the UNet and the ControlNets in NHWC layout,
        the layout of GPU tensor-core convolutions (BENCHMARKS.md measures it).
        ``packed_weights``: on a CPU in fp32, the denoising loop runs every UNet and ControlNet
        convolution on a oneDNN-packed weight instead of repacking it at every call
        (``ctrlnet.prepack``, in place: the weights are packed at the first step and restored
        exactly after the loop; meanwhile, ``callback`` included, their storage is empty); None =
        on where that applies; a ``PackedWeights`` to choose otherwise (kept across calls, linear
        layers too).
        ``compile``: the denoising loop calls the UNet and the ControlNets through ``torch.compile``
        (True: ``dynamic=False``, on a GPU with ``mode="reduce-overhead"``, i.e. CUDA graphs, which
        remove the per-kernel launch cost that bounds a GPU step; a dict: ``torch.compile``'s keyword
        arguments). On a CPU the loop runs under inductor's ``freezing`` (weights folded in as
        constants and packed by inductor, so ``packed_weights`` is off). Every new image size, batch
        (images, CFG, regions), set of active nets, scale or control mode is one more graph to compile
        (minutes for SD1.5-sized models; after ``torch._dynamo.config.recompile_limit`` (8) graphs a
        model runs uncompiled). Compiled graphs keep the weights they saw: after changing weights
        call ``torch._dynamo.reset()``. BENCHMARKS.md measures it.
        ``backend``: "torch", or "openvino" (CPU only, optional extra): the UNet, the ControlNets and the
        VAE decoder run as OpenVINO models (``pipeline.openvino``), ``dtype`` (fp32 or bf16) being
        OpenVINO's inference precision while the torch modules stay fp32 (a base in another dtype is
        cast to fp32); or an ``OpenVINOBackend`` (its cache folder, precision, compiled shapes kept),
        whose precision ``dtype`` must then be or leave at fp32."""
        if (backend == "openvino" or isinstance(backend, OpenVINOBackend)) and base.unet.device.type != "cpu":
            raise ValueError(f"backend openvino runs on the CPU; the base is on {base.unet.device}")
        self.openvino = openvino_backend(backend, dtype, packed_weights, compile)
        if self.openvino is not None:
            packed_weights = False
            dtype = torch.float32  # the torch side (text encoders, hint encoders, VAE encoder) in fp32
            if base.unet.dtype != dtype:
                base.to(dtype=dtype)
        self.base = base
        self.dtype = dtype
        self.channels_last = channels_last
        device = base.unet.device.type
        cpu_fp32 = device == "cpu" and dtype == torch.float32 and packing_available()
        # `is not` tests: a PackedWeights is falsy while it holds nothing (it has a __len__)
        packing_asked = packed_weights is not None and packed_weights is not False
        if packing_asked and not cpu_fp32:
            raise ValueError("packed_weights=True needs the CPU, fp32 and a PyTorch with oneDNN "
                             f"(here: {device}, {dtype}, oneDNN {packing_available()})")
        compiling = isinstance(compile, dict) or bool(compile)  # {} = torch.compile's defaults
        if packing_asked and compiling:
            raise ValueError("packed_weights and compile exclude each other: a compiled CPU graph packs its "
                             "weights itself (inductor freezing); pass one of them")
        if compiling and device == "cpu" and (compile if isinstance(compile, dict) else {}).get("backend", "inductor") \
                == "inductor" and not (os.environ.get("CXX") or any(shutil.which(c) for c in ("c++", "g++", "clang++"))):
            raise ValueError("compile on a CPU needs a C++ compiler for inductor's kernels (c++, g++ or clang++ on "
                             "PATH, or CXX): install one (Debian: apt install g++) or leave compile off")
        if isinstance(compile, dict):
            self.compile_kwargs: dict | None = dict(compile)
        elif compiling:
            self.compile_kwargs = {"mode": "reduce-overhead", "dynamic": False} if device == "cuda" else {"dynamic": False}
        else:
            self.compile_kwargs = None
        # inductor's freezing must be on while dynamo traces (it decides then whether weights become
        # constants), i.e. during the loop's first calls, not only in torch.compile(options=...)
        self.inductor_config = {"freezing": True} if compiling and device == "cpu" else {}
        self._compiled: dict[int, Any] = {}  # id(module) -> its torch.compile wrapper
        if isinstance(packed_weights, PackedWeights):
            self.packed = packed_weights
        else:
            use = cpu_fp32 and not compiling if packed_weights is None else packed_weights
            self.packed = PackedWeights(in_place=True) if use else None
        if channels_last:
            base.unet.to(memory_format=torch.channels_last)
        self.name = name or Path(str(base.source)).name
        self.controlnets: dict[str, ControlNet] = {}
        for key, net in (controlnets or {}).items():
            self.add_controlnet(key, net)

    @classmethod
    def from_pretrained(cls, base: str | Path | LockedBase = "nano", controlnets: Sequence[Any] = (),
                        dtype: str | torch.dtype = "fp32", device: str | torch.device | None = None,
                        channels_last: bool = False, packed_weights: bool | None = None,
                        compile: bool | dict = False, tokenizer: str | Path | None = None,
                        backend: str | OpenVINOBackend = "torch") -> "Pipeline":
        """``base``: "nano" (bundled), a diffusers folder or a single-file checkpoint (``tokenizer``: a
        tokenizer folder to use instead of the shipped CLIP one, see ``load_base``); ``controlnets``:
        names/paths/loaded nets; ``dtype``: fp32 | bf16 | fp16 (weights and compute);
        ``packed_weights``, ``compile``, ``backend``: see ``__init__``."""
        if isinstance(dtype, str) and dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}: use fp32, bf16 or fp16")
        torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        wants_openvino = backend == "openvino" or isinstance(backend, OpenVINOBackend)
        if wants_openvino and device is not None and torch.device(device).type != "cpu":
            raise ValueError(f"backend openvino runs on the CPU, not {device}")
        # checked before the base loads: the name, the other options, the package, the precision
        openvino = openvino_backend(backend, torch_dtype, packed_weights, compile)
        if openvino is not None:
            device = "cpu"
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if torch_dtype == torch.float16 and device.type == "cpu":
            warnings.warn("fp16 on a CPU is very slow (no fp16 matmul units); use bf16 or fp32", SlowDtypeWarning,
                          stacklevel=2)
        if torch_dtype == torch.bfloat16 and device.type == "cpu" and not cpu_has_native_bf16():
            warnings.warn("this CPU has no native bf16 (AVX512-BF16 / AMX): OpenVINO will run f32 instead"
                          if openvino else "this CPU has no native bf16 (AVX512-BF16 / AMX): bf16 is emulated and "
                          "far slower than fp32; use --dtype fp32", SlowDtypeWarning, stacklevel=2)
        # loaded straight in the dtype asked for: an fp16 file run in bf16 never makes an fp32 copy
        torch_dtype = torch.float32 if openvino else torch_dtype  # OpenVINO converts from fp32 modules
        base_model = base if isinstance(base, LockedBase) else load_base(base, dtype=torch_dtype, tokenizer=tokenizer)
        pipe = cls(base_model.to(device, torch_dtype), dtype=torch_dtype,
                   name=NANO if is_nano(base) else "", channels_last=channels_last,
                   packed_weights=packed_weights, compile=compile, backend=openvino or "torch")
        for net in controlnets:
            pipe.controlnet(net)
        return pipe

    # ------------------------------------------------------------------ models

    def add_controlnet(self, key: str, net: ControlNet | T2IAdapter) -> ControlNet | T2IAdapter:
        """Add a control network of any kind (``formats.kinds``) under ``key``."""
        check_compatible(net, self.base, key)
        if self.openvino is not None and kind_name(net) != "controlnet":
            raise ValueError(f"{key}: backend openvino runs classic ControlNets; a {kind_name(net)} needs backend "
                             "torch (or convert a Control-LoRA to a full ControlNet: ctrlnet convert --to diffusers)")
        if isinstance(net, ControlLoRA):  # built on this base's own tensors; only its own ones move
            if not net.tied_to(self.base.unet):
                raise ValueError(f"{key}: this Control-LoRA is built on another base's weights; load it with this "
                                 "pipeline's base (pipe.controlnet(path), or load_control(path, unet=pipe.base.unet))")
            if key in self.controlnets and self.controlnets[key] is not net:
                self.remove_controlnet(key)
            net.own_to(self.base.unet.device, self.dtype,
                       torch.channels_last if self.channels_last else None).eval().requires_grad_(False)
            self.controlnets[key] = net
            return net
        if key in self.controlnets and self.controlnets[key] is not net:
            self.remove_controlnet(key)  # the replaced net's compiled / converted models go with it
        net = net.to(self.base.unet.device, self.dtype).eval().requires_grad_(False)
        if self.channels_last:
            net.to(memory_format=torch.channels_last)
        self.controlnets[key] = net
        return net

    def remove_controlnet(self, key: str) -> None:
        """Unload a ControlNet: drop it and its compile wrapper (which would keep it alive)."""
        net = self.controlnets.pop(key, None)
        if net is not None:
            self._compiled.pop(id(net), None)
            if self.openvino is not None:
                self.openvino.forget(net)

    @property
    def backend(self) -> str:
        return "openvino" if self.openvino is not None else "torch"

    def reset_backend(self) -> None:
        """After changing weights in place: forget the OpenVINO models and torch.compile graphs made
        from the old ones (the next call converts or compiles again)."""
        if self.openvino is not None:
            self.openvino.reset()
        self._compiled.clear()
        if self.compile_kwargs is not None:
            torch._dynamo.reset()

    def compiled(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` as the denoising loop calls it: its ``torch.compile`` wrapper (made once, kept
        with the Pipeline) when ``compile`` is on, else itself. The wrapper passes attribute reads
        (``config``, ``dtype``) through to the module. (The wrapper keeps its module alive, so an id
        is never reused for another module while its entry exists.) With backend openvino: its
        OpenVINO stand-in (``pipeline.openvino``)."""
        if self.openvino is not None:
            return self.openvino.wrap(module)
        if self.compile_kwargs is None:
            return module
        if id(module) not in self._compiled:
            self._compiled[id(module)] = torch.compile(module, **self.compile_kwargs)
        return self._compiled[id(module)]

    def controlnet(self, model: Any) -> ControlNet | T2IAdapter:
        """A loaded control network of any kind for a name, path or net (loaded once, then reused; a
        Control-LoRA on this pipeline's base)."""
        if isinstance(model, (ControlNet, T2IAdapter)):
            key = f"net{id(model)}"
            return self.controlnets.get(key) or self.add_controlnet(key, model)
        key = str(model)
        if key not in self.controlnets:
            self.add_controlnet(key, load_control(key, unet=self.base.unet, dtype=self.dtype))
        return self.controlnets[key]

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: VAE factor x 2**(UNet downsamplers)."""
        return self.base.vae_scale_factor * 2 ** (len(self.base.unet.config.block_out_channels) - 1)

    # ------------------------------------------------------------------ defaults

    def default_guidance(self) -> tuple[float, float]:
        """(guidance, guidance_rescale) for this base (``sampling.default_guidance``)."""
        return default_guidance(self.base)

    @property
    def native_size(self) -> int:
        """The side the base was trained at (nano 128, SD1.5 512, SDXL 1024)."""
        return self.base.unet.config.sample_size * self.base.vae_scale_factor

    # ------------------------------------------------------------------ prepare steps

    def output_size(self, width: int | None, height: int | None, ref: np.ndarray | None,
                    max_side: int = MAX_SIDE, max_pixels: int | None = None) -> tuple[int, int]:
        """Sides rounded to the size multiple; missing sides follow ``ref`` (the init or first control
        image): its short side to the native size, aspect kept (the original apps' resize_image).

        Caps: a size derived from ``ref`` is scaled down, aspect kept, until it fits ``max_side`` per
        side and ``max_pixels`` in all (a 1x256 condition would otherwise ask for 32768x128), and
        rounded down to the multiple; a size the caller gave that does not fit is a ValueError."""
        m, native = self.size_multiple, self.native_size

        def fits(w: float, h: float) -> bool:
            return max(w, h) <= max_side and (not max_pixels or w * h <= max_pixels)
        if width is None and height is None:
            if ref is None:
                width = height = native
            else:
                k = native / min(ref.shape[:2])
                width, height = ref.shape[1] * k, ref.shape[0] * k
            w, h = round_size(int(round(width)), m), round_size(int(round(height)), m)
            if fits(w, h):
                return w, h
            k = min(max_side / max(width, height), math.sqrt(max_pixels / (width * height)) if max_pixels else 1)
            return max(m, int(width * k) // m * m), max(m, int(height * k) // m * m)
        width = width if width is not None else height
        height = height if height is not None else width
        w, h = round_size(int(round(width)), m), round_size(int(round(height)), m)
        if not fits(w, h):
            limit = f"{max_side} px per side" + (f" and {max_pixels:,} pixels" if max_pixels else "")
            raise ValueError(f"width x height: {width}x{height} (rounded to multiples of {m}: {w}x{h}) is over the "
                             f"limit of {limit}")
        return w, h

    @staticmethod
    def prepare_images(controls: Sequence[Control], n_prompts: int) -> list[list[np.ndarray | None]]:
        """Each control's image(s) decoded once: per control, one (H, W, 3) uint8 array (or None for
        an inpaint control without its own image), or one per prompt."""
        decoded = []
        for c in controls:
            if c.per_prompt and len(c.image) != n_prompts:
                raise ValueError(f"control {c.model}: {len(c.image)} images for {n_prompts} prompts")
            images = c.image if c.per_prompt or c.multi else [c.image]  # a multi-type unit: one per type
            decoded.append([as_rgb(im, f"control {c.model} image") if im is not None else None for im in images])
        return decoded

    @staticmethod
    def prepare_mask(mask: Any, width: int, height: int) -> np.ndarray:
        """(height, width) float32, 1 = repaint, resized as an area (not thinned like an edge map)."""
        m = as_rgb(mask, "mask").max(axis=2)
        return (resize_to(np.repeat(m[:, :, None], 3, 2), width, height, resize=resize_plain)[..., 0]
                > 127).astype(np.float32)

    def condition_map(self, control: Control, rgb: np.ndarray | None, width: int, height: int,
                      init: np.ndarray | None = None, mask: np.ndarray | None = None) -> np.ndarray:
        """The (height, width, 3) condition of ``control`` from its decoded image ``rgb``, as float32
        in [0, 1] (inpaint: the control's image or the init image, masked pixels -1)."""
        if control.annotator == "inpaint":
            source = rgb if rgb is not None else init
            if source is None or mask is None:
                raise ValueError("annotator=inpaint needs an init image (or the control's image) and a mask")
            cond = resize_to(source, width, height, control.resize_mode).astype(np.float32) / 255.0
            cond[mask > 0.5] = -1.0  # the inpaint ControlNet's marker for pixels to repaint
            return cond
        if control.annotator:  # "pixel perfect": the photo is brought to the output size, then annotated
            return condition_for(control.annotator, control.annotator_params, rgb, width, height,
                                 control.resize_mode).astype(np.float32) / 255.0
        return resize_to(rgb, width, height, control.resize_mode).astype(np.float32) / 255.0

    def check_unit(self, control: Control) -> ControlNet | T2IAdapter:
        """The unit's loaded net after the checks that need it (its kind's rules: a Union net's types, an
        adapter's one scale; a weight per residual or one for all), before any work: a ValueError
        naming the unit."""
        net = self.controlnet(control.model)
        where = f"control {control.model}"
        kind = kind_name(net)
        if control.types and kind != "union":
            raise ValueError(f"{where}: type= applies to Union ControlNets; this is a {kind}")
        if kind == "t2i_adapter":
            if not isinstance(control.scale, (int, float)):
                raise ValueError(f"{where}: a T2I-Adapter takes one scale, not one per residual")
            if control.every > 1:
                raise ValueError(f"{where}: every= reuses ControlNet residuals; a T2I-Adapter's features are "
                                 "computed once anyway (leave every at 1)")
            if control.mode == "prompt":
                raise ValueError(f"{where}: a T2I-Adapter has no per-residual soft scales: use mode balanced or "
                                 "control")
            return net
        if kind == "union":
            if not control.types:
                raise ValueError(f"{where}: a Union ControlNet needs type= (one of {', '.join(net.type_names)})")
            for t in control.types:
                net.type_index(t, where)
        try:  # one weight per residual, or one for all
            net.residual_scales(control.scale)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        return net

    def prepare_controls(self, controls: Sequence[Control], decoded: list[list[np.ndarray | None]], width: int,
                         height: int, init: np.ndarray | None, mask: np.ndarray | None, b: int,
                         num_images: int) -> tuple[list, list[ActiveControl], list[ActiveAdapter]]:
        """(condition maps: one (H, W, 3) float array or a list of them (per prompt, or per type of a
        multi-type Union unit) per control; the loop's ``ActiveControl``s with their hint features and
        ``ActiveAdapter``s with their features, all computed once per generation)."""
        maps, actives, adapters = [], [], []
        device = self.base.unet.device

        def batch_rows(x: torch.Tensor, per_prompt: bool) -> torch.Tensor:  # (1 or P, ...) -> (B, ...)
            return x.repeat_interleave(num_images, 0) if per_prompt else x.expand(b, *x.shape[1:])

        def as_tensor(cmaps: list[np.ndarray]) -> torch.Tensor:  # (1 or P, 3, H, W)
            return torch.from_numpy(np.stack(cmaps)).permute(0, 3, 1, 2).to(device, self.dtype)

        for c, images in zip(controls, decoded):
            net = self.check_unit(c)
            where = f"control {c.model}"
            kind = kind_name(net)
            if kind == "t2i_adapter":
                cmaps = [self.condition_map(c, rgb, width, height, init, mask) for rgb in images]
                maps.append(cmaps if c.per_prompt else cmaps[0])
                cond = as_tensor(cmaps)
                if net.config.in_channels == 1:  # sketch / canny adapters read one channel (ComfyUI: the mean)
                    cond = cond.mean(dim=1, keepdim=True)
                with torch.no_grad():
                    feats = net(cond.to(net.dtype))
                adapters.append(ActiveAdapter([batch_rows(f * c.scale, c.per_prompt) for f in feats],
                                              c.start, c.end, c.mode))
                continue
            kwargs = {}
            if kind == "union":
                pairs = c.pairs() if c.multi else [c]
                kwargs["control_types"] = [net.type_index(t, where) for t in c.types]
                if c.multi:  # one image per type, each its own condition map
                    cmaps = [self.condition_map(p, rgb, width, height, init, mask) for p, rgb in zip(pairs, images)]
                    maps.append(tuple(cmaps))  # a tuple: one map per type (a list is one per prompt)
                    hint = torch.stack([net.embed_condition(as_tensor([m])) for m in cmaps], dim=1)  # (1, n, C0, h, w)
                    actives.append(ActiveControl(self.compiled(net), batch_rows(hint, False), c.scale, c.start, c.end,
                                                 c.mode, c.every, kwargs))
                    continue
            cmaps = [self.condition_map(c, rgb, width, height, init, mask) for rgb in images]  # (H, W, 3) float
            maps.append(cmaps if c.per_prompt else cmaps[0])
            hint = net.embed_condition(as_tensor(cmaps))  # (1 or P, C0, h, w)
            if kind == "union":
                hint = hint[:, None]  # (1 or P, 1, C0, h, w): one pair
            actives.append(ActiveControl(self.compiled(net), batch_rows(hint, c.per_prompt), c.scale, c.start, c.end,
                                         c.mode, c.every, kwargs))
        return maps, actives, adapters

    def prepare_timesteps(self, scheduler: str, steps: int, strength: float, img2img: bool):
        """(scheduler, timesteps); img2img skips the first 1 - strength of them."""
        sched = make_scheduler(scheduler, self.base.scheduler.config)
        sched.set_timesteps(steps, device=self.base.unet.device)
        timesteps = sched.timesteps
        if img2img and strength < 1:
            keep = max(1, int(round(steps * strength)))
            timesteps = timesteps[(steps - keep) * sched.order:]
            if hasattr(sched, "set_begin_index"):
                sched.set_begin_index((steps - keep) * sched.order)
        return sched, timesteps

    def prepare_latents(self, b: int, width: int, height: int, seed: int, sched, timesteps: torch.Tensor,
                        init: np.ndarray | None, mask: np.ndarray | None,
                        strength: float) -> tuple[torch.Tensor, Inpainting | None]:
        """(initial latents (B, C, h, w), inpainting or None): per-sample noise (seed + i); img2img
        starts from the noised init image."""
        base, factor = self.base, self.base.vae_scale_factor
        device = base.unet.device
        shape = (base.vae.config.latent_channels, height // factor, width // factor)
        noise = initial_noise(shape, b, seed).to(device)
        if init is None:
            return noise * sched.init_noise_sigma, None
        x = torch.from_numpy(init).permute(2, 0, 1)[None].float() / 127.5 - 1  # (1, 3, H, W)
        image_latents = encode_image(base, x).expand(b, -1, -1, -1).to(device)
        latents = sched.add_noise(image_latents, noise, timesteps[:1]) if strength < 1 else noise * sched.init_noise_sigma
        if mask is None:
            return latents, None
        lm = torch.from_numpy(mask)[None, None]  # (1, 1, H, W)
        lm = torch.nn.functional.interpolate(lm, size=shape[1:], mode="nearest").expand(b, -1, -1, -1)
        masked = None
        if base.unet.config.in_channels == 9:
            masked = encode_image(base, x * (1 - torch.from_numpy(mask)[None, None])).expand(b, -1, -1, -1).to(device)
        return latents, Inpainting(lm.to(device), image_latents, noise, masked)

    def prepare_regions(self, regions, n_prompts: int, num_images: int, width: int, height: int) -> RegionBatch | None:
        """The loop's ``RegionBatch``: R region prompts per image (padded with "" and an empty mask
        where a prompt has fewer), their text embeddings and latent-grid weights."""
        if isinstance(regions, Region):
            regions = [regions]
        if not regions:
            return None
        per_prompt = [list(regions)] * n_prompts if isinstance(regions[0], Region) else [list(r) for r in regions]
        if len(per_prompt) != n_prompts:
            raise ValueError(f"regions: {len(per_prompt)} lists for {n_prompts} prompts; give one list per prompt, "
                             "or one list of Region for all")
        r_max = max(len(r) for r in per_prompt)
        if r_max == 0:
            return None
        f = self.base.vae_scale_factor
        weights = torch.zeros(r_max, n_prompts, 1, height // f, width // f)
        texts = [[""] * n_prompts for _ in range(r_max)]
        for p, items in enumerate(per_prompt):
            for r, region in enumerate(items):
                if not isinstance(region, Region):
                    raise ValueError(f"regions: item {r} of prompt {p} is a {type(region).__name__}, not a Region")
                texts[r][p] = region.prompt
                m = as_rgb(region.mask, f"region {r} mask").max(axis=2)  # (H, W) uint8
                m = resize_to(np.repeat(m[:, :, None], 3, 2), width, height, region.resize_mode, resize_plain)[..., 0]
                m = torch.from_numpy(m.astype(np.float32) / 255)[None, None]  # (1, 1, H, W)
                weights[r, p] = torch.nn.functional.interpolate(m, size=weights.shape[-2:], mode="area")[0]
        warn_long_prompts(self.base.tokenizer, [t for row in texts for t in row])
        rows = [repeat_prompts(row, num_images) for row in texts]  # (R, B) prompts, as the images
        encoded = [encode_text(self.base, row) for row in rows]
        return RegionBatch(text=torch.cat([e[0] for e in encoded]),  # (R*B, T, D)
                           weights=weights.repeat_interleave(num_images, 1).to(self.base.unet.device),
                           prompts=[[rows[r][i] for r in range(r_max) if rows[r][i]]
                                    for i in range(n_prompts * num_images)],
                           text_embeds=torch.cat([e[1] for e in encoded]) if encoded[0][1] is not None else None)

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], controls: Sequence[Control] = (), negative_prompt: str = "",
                 steps: int = 20, guidance: float | None = None, guidance_rescale: float | None = None,
                 seed: int = 0, num_images: int = 1, width: int | None = None, height: int | None = None,
                 scheduler: str = "ddim", init_image: Any = None, strength: float = 1.0, mask: Any = None,
                 progress: bool = False, callback=None, output_type: str = "pil",
                 regions: Region | Sequence[Region] | Sequence[Sequence[Region]] = (), stop=None) -> Result:
        """Generate ``num_images`` images per prompt. ``guidance``/``guidance_rescale`` default to
        the base's own (``default_guidance``). Numbers must lie in their ``ranges.RANGES`` (a
        ValueError names the argument, the value and the range). ``seed``: image i uses seed + i;
        -1 draws a random seed, reported in ``Result.seeds`` and the parameters text. ``width`` /
        ``height``: missing ones follow the first condition (or init) image (``output_size``).
        ``regions``: ``Region``s for every prompt, or one list of them per prompt. ``callback(i)``
        is called after denoising step i; when ``stop()`` is then true the remaining steps are skipped
        and the latents so far decoded (an interrupt: the images are noisier, not lost).
        ``output_type="latent"`` skips decoding."""
        default_guidance, default_rescale = self.default_guidance()
        guidance = guidance if guidance is not None else default_guidance
        guidance_rescale = guidance_rescale if guidance_rescale is not None else default_rescale
        # 1. Check inputs; decode every image once.
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        check_args(steps=steps, num_images=num_images, guidance=guidance, guidance_rescale=guidance_rescale,
                   strength=strength, width=width, height=height)
        seed = resolve_seed(seed, len(prompts) * num_images)
        for c in controls:
            c.check()
        if mask is not None and init_image is None:
            raise ValueError("a mask needs an init image (init_image=...)")
        warn_long_prompts(self.base.tokenizer, prompts + [negative_prompt])
        n_prompts = len(prompts)
        decoded = self.prepare_images(controls, n_prompts)
        init = as_rgb(init_image, "init image") if init_image is not None else None
        ref = init if init is not None else next((images[0] for images in decoded if images[0] is not None), None)
        width, height = self.output_size(width, height, ref)
        prompts = repeat_prompts(prompts, num_images)
        b = len(prompts)
        # 2. Prompts: [uncond; cond] for classifier-free guidance (SDXL: with pooled text and time ids).
        text, added = guidance_text(self.base, prompts, negative_prompt, guidance > 1, height, width)
        region_batch = self.prepare_regions(regions, n_prompts, num_images, width, height)
        # 3. Init image and mask (img2img / inpainting), resized like the conditions.
        init_rs = resize_to(init, width, height) if init is not None else None
        mask_rs = self.prepare_mask(mask, width, height) if mask is not None else None
        # 4. Conditions and their hint features, once per generation.
        maps, actives, adapters = self.prepare_controls(controls, decoded, width, height, init_rs, mask_rs, b,
                                                        num_images)
        # 5. Timesteps, 6. latents.
        sched, timesteps = self.prepare_timesteps(scheduler, steps, strength, init_rs is not None)
        latents, inpaint = self.prepare_latents(b, width, height, seed, sched, timesteps, init_rs, mask_rs, strength)
        # 7. Denoising loop.
        latents = self.run_loop(latents, text, sched, timesteps, guidance, guidance_rescale, actives, added,
                                torch.Generator().manual_seed(seed), inpaint, region_batch, progress, callback, stop,
                                adapters)
        # 8. Decode, with the parameters of each image.
        seeds = [seed + i for i in range(b)]
        params = [self.parameters_text(p, negative_prompt, steps, scheduler, guidance, guidance_rescale,
                                       seeds[i], width, height, controls,
                                       strength if init is not None else None,
                                       region_batch.prompts[i] if region_batch else ())
                  for i, p in enumerate(prompts)]
        to_uint8 = lambda m: np.clip(m * 255, 0, 255).astype(np.uint8)
        conditions = [type(m)(to_uint8(x) for x in m) if isinstance(m, (list, tuple)) else to_uint8(m) for m in maps]
        if output_type == "latent":
            return Result([], conditions, params, latents, num_images, seeds)
        images = self.decode(latents).numpy()
        return Result([Image.fromarray(a) for a in images], conditions, params, latents, num_images, seeds)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents -> (B, H, W, 3) uint8, through the backend's VAE decoder."""
        vae = self.openvino.wrap(self.base.vae) if self.openvino is not None else self.base.vae
        return decode(dataclasses.replace(self.base, vae=vae), latents)

    def run_loop(self, latents, text, sched, timesteps, guidance, guidance_rescale, actives, added, generator,
                 inpaint, region_batch, progress: bool, callback, stop=None, adapters=()) -> torch.Tensor:
        """``sampling.denoise`` with what this Pipeline adds around it: compiled modules, inductor's
        freezing while they trace, packed weights, the progress bar and the callback."""
        bar = tqdm(total=len(timesteps), desc="sampling", unit="step") if progress else None

        def on_step(i: int) -> None:
            if bar is not None:
                bar.update(1)
            if callback is not None:
                callback(i)
        loop_base = dataclasses.replace(self.base, unet=self.compiled(self.base.unet))
        cuda_graphs = self.compile_kwargs is not None and self.base.unet.device.type == "cuda"
        freezing = inductor_config.patch(self.inductor_config) if self.inductor_config else contextlib.nullcontext()
        # packed weights in the loop only: the text encoder and the VAE run once per call, where a
        # packed copy would cost memory and save nothing
        # a Control-LoRA's merged weights (base + up @ down) exist during the loop only
        loras = {id(n): n for n in self.controlnets.values() if isinstance(n, ControlLoRA)}
        used = [loras[id(getattr(a.net, "_orig_mod", a.net))] for a in actives
                if id(getattr(a.net, "_orig_mod", a.net)) in loras]
        with contextlib.ExitStack() as stack:
            for net in {id(n): n for n in used}.values():
                stack.enter_context(net.merged())
            stack.enter_context(self.packed.active() if self.packed is not None else contextlib.nullcontext())
            stack.enter_context(freezing)
            latents = denoise(loop_base, latents, text, sched, timesteps, guidance, guidance_rescale, actives, added,
                              generator=generator, inpaint=inpaint, callback=on_step, regions=region_batch,
                              cuda_graphs=cuda_graphs, stop=stop, adapters=adapters)
        if bar is not None:
            bar.close()
        return latents

    def parameters_text(self, prompt, negative_prompt, steps, scheduler, guidance, guidance_rescale, seed, width,
                        height, controls, strength, region_prompts=()) -> str:
        """The A1111 "parameters" text: prompt, negative prompt, then "Key: value" pairs."""
        items = [("Steps", steps), ("Sampler", sampler_label(scheduler)), ("CFG scale", guidance),
                 ("Seed", seed), ("Size", f"{width}x{height}"), ("Model", self.name)]
        if guidance_rescale:
            items.append(("CFG rescale", guidance_rescale))
        if strength is not None:
            items.append(("Denoising strength", strength))
        mode_names = {"balanced": "Balanced", "prompt": "My prompt is more important",
                      "control": "ControlNet is more important"}
        for i, c in enumerate(controls):
            model = c.model if not isinstance(c.model, (ControlNet, T2IAdapter)) else "custom"
            module = "+".join(a or "none" for a in c.annotator) if isinstance(c.annotator, (list, tuple)) else \
                (c.annotator or "none")
            unit = (f"Module: {module}, Model: {model}, Weight: {c.scale}, Resize Mode: "
                    f"{c.resize_mode}, Guidance Start: {c.start}, Guidance End: {c.end}, Control Mode: "
                    f"{mode_names[c.mode]}" + (f", Every: {c.every}" if c.every > 1 else "")
                    + (f", Type: {'+'.join(str(t) for t in c.types)}" if c.types else ""))
            items.append((f"ControlNet {i}", f'"{unit}"'))
        for i, rp in enumerate(region_prompts):
            items.append((f"Region {i}", f'"{rp}"'))
        text = prompt + (f"\nNegative prompt: {negative_prompt}" if negative_prompt else "")
        return text + "\n" + ", ".join(f"{k}: {v}" for k, v in items)


def repeat_prompts(prompts: list[str], num_images: int) -> list[str]:
    """The batch's prompt order: ``num_images`` rows per prompt, image i of prompt p at p * num_images + i."""
    return [p for p in prompts for _ in range(num_images)]


def grid(result: Result, path: str | Path) -> Path:
    """One row per image: its condition maps, then the image."""
    rows = []
    for i, image in enumerate(result.images):
        a = np.asarray(image)
        maps = [x for m in result.conditions for x in (
            [m] if isinstance(m, np.ndarray) else m if isinstance(m, tuple) else [m[i // result.num_images]])]
        cells = [np.asarray(Image.fromarray(m).resize(image.size)) for m in maps] + [a]
        rows.append(np.concatenate(cells, axis=1))
    path = Path(path)
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)
    return path

"""Prepacked oneDNN weights for CPU inference.

PyTorch's CPU convolution (``aten::mkldnn_convolution``) reorders its weight from the plain OIHW
layout into oneDNN's blocked layout on every call. For the UNet's deep layers at small latent
sizes that reorder costs more than the arithmetic: a 1280->1280 3x3 convolution on a 4x4 latent
(SD1.5 at 256 px, batch 2) ran at 25 GFLOPS on this project's 2-vCPU machine, and at 142 GFLOPS
with its weight packed once (``benchmarks/bench_conv_packing.py``, BENCHMARKS.md). Linear layers gain
little in the UNet (MKL's plain GEMM is already efficient there), so they are packed on request only.

``PackedWeights`` keeps one packed copy per weight (made on first use, made again when the weight
changes in place or meets another input shape) and, inside ``with packed.active():``, a
``TorchFunctionMode`` (per thread) routes ``F.conv2d`` (and, on request, ``F.linear``) calls whose
weight it can pack to oneDNN's prepacked kernels; every other call runs unchanged. No module is
patched and outside the ``with`` block nothing changes.

Memory: by default the packed copies sit next to the weights and are reused by later blocks (3.05
GiB more for an SD1.5 UNet + ControlNet's convolutions). ``in_place=True`` (what ``ctrlnet.Pipeline``
uses) instead releases each packed weight's own storage while the block runs and restores it,
bit-exact, when the block ends: no extra memory, one packing per block (the first denoising step).

Used by ``ctrlnet.Pipeline`` around its denoising loop on the CPU in fp32 (``packed_weights``).
Results differ from the plain kernels by float rounding only (~1e-6 relative).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def available() -> bool:
    """oneDNN's prepacked convolution and linear kernels exist in this PyTorch build."""
    return (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and hasattr(torch.ops.mkldnn, "_convolution_pointwise") and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _ints(v, n: int = 2) -> list[int] | None:
    if isinstance(v, int):
        return [v] * n
    if isinstance(v, (tuple, list)) and len(v) == n and all(isinstance(i, int) for i in v):
        return list(v)
    return None  # e.g. padding="same": left to the plain kernel


class PackedWeights:
    """Packed copies of conv2d / linear weights and the mode that uses them (see the module doc).

    ``dtypes``: the weight dtypes to pack (default float32; bf16 gains only where the CPU has
    native bf16). ``linear``: pack linear layers too (off by default: on an SD1.5-sized step it
    saved 1.5% of the time for 1.5 GiB more memory, BENCHMARKS.md).
    ``in_place``: while active, a packed weight's own storage is released (``weight.data`` is
    emptied) and, when the ``with`` block ends (also on an exception), restored exactly from the
    packed copy (a reorder is a permutation): no extra memory, at the price of packing again at
    every ``with`` block (the first step) and restoring at its end. Not for two threads running the
    same models at once. Off: packed copies are kept next to the weights and reused across blocks.
    """

    def __init__(self, dtypes: tuple[torch.dtype, ...] = (torch.float32,), linear: bool = False,
                 in_place: bool = False):
        self.dtypes = dtypes
        self.linear = linear
        self.in_place = in_place
        # id(weight) -> (weakref to it, its version, the input shape packed for, its shape, packed copy)
        self._cache: dict[int, tuple[weakref.ref, int, tuple, torch.Size, torch.Tensor]] = {}
        self.last_packed = 0  # weights packed in the last in-place block, and their bytes
        self.last_nbytes = 0

    @property
    def nbytes(self) -> int:
        """Bytes held by the packed copies of weights still alive."""
        return sum(p.numel() * p.element_size() for w, *_, p in self._cache.values() if w() is not None)

    def __len__(self) -> int:
        return sum(1 for w, *_ in self._cache.values() if w() is not None)

    def clear(self) -> None:
        """Drop the packed copies (in place: put every released weight back first)."""
        if self.in_place:
            self.last_packed, self.last_nbytes = len(self), self.nbytes
            while self._cache:  # one weight at a time, its packed copy freed before the next is restored
                _, (ref, _, _, _, packed) = self._cache.popitem()
                weight = ref()
                if weight is not None:
                    weight.data = packed.to_dense()
                del packed
        self._cache.clear()

    def active(self) -> TorchFunctionMode:
        """A context manager: inside it (on this thread), conv2d / linear calls use packed weights."""
        return _Mode(self)

    def _usable(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        return (x.numel() > 0 and x.device.type == "cpu" and weight.device.type == "cpu" and x.dtype == weight.dtype
                and weight.dtype in self.dtypes and weight.layout == torch.strided and x.layout == torch.strided
                and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))

    def _released(self, weight: torch.Tensor):
        """The cache entry of a weight whose storage was released (in place), else None."""
        hit = self._cache.get(id(weight))
        return hit if self.in_place and hit is not None and hit[0]() is weight else None

    def shape(self, weight: torch.Tensor) -> torch.Size:
        hit = self._released(weight)
        return hit[3] if hit is not None else weight.shape

    def plain(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight``'s values in the plain layout (from the packed copy if its storage was released)."""
        hit = self._released(weight)
        return hit[4].to_dense() if hit is not None else weight

    def _packed(self, weight: torch.Tensor, shape: tuple, pack) -> torch.Tensor:
        """The packed copy of ``weight`` for inputs of ``shape``: oneDNN picks the blocked layout for
        the input size (without it a 320-channel 3x3 convolution on 32x32 ran 2.6x slower), so a
        weight seen with another input shape, or changed in place, is packed again."""
        key = id(weight)
        hit = self._cache.get(key)
        if hit is not None and hit[0]() is weight and hit[2] == shape and (self.in_place or hit[1] == weight._version):
            return hit[4]
        plain = self.plain(weight).detach()
        packed = pack(plain)
        if self.in_place:
            weight.data = plain.new_empty(0)  # released; clear() restores it from the packed copy
        ref = weakref.ref(weight, lambda _, key=key, cache=self._cache: cache.pop(key, None))
        self._cache[key] = (ref, weight._version, shape, plain.shape, packed)
        return packed

    def conv2d(self, x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        """``F.conv2d`` through a packed weight, or None where the plain kernel must run."""
        stride, padding, dilation = _ints(stride), _ints(padding), _ints(dilation)
        if (None in (stride, padding, dilation) or x.dim() != 4 or len(self.shape(weight)) != 4
                or not self._usable(x, weight) or (bias is not None and bias.dtype != x.dtype)):
            return None
        packed = self._packed(weight, tuple(x.shape), lambda w: torch._C._nn.mkldnn_reorder_conv2d_weight(
            w.to_mkldnn(), padding, stride, dilation, groups, list(x.shape)))
        # oneDNN returns its preferred layout (channels-last); the next layers accept either
        return torch.ops.mkldnn._convolution_pointwise(x, packed, bias, padding, stride, dilation, groups,
                                                       "none", [], "")

    def linear_(self, x, weight, bias=None):
        """``F.linear`` through a packed weight, or None where the plain kernel must run."""
        shape = self.shape(weight)
        if not self.linear or len(shape) != 2 or x.dim() < 2 or not self._usable(x, weight) \
                or (bias is not None and bias.dtype != x.dtype):
            return None
        rows = x.numel() // x.shape[-1]
        packed = self._packed(weight, (rows,), lambda w: torch.ops.mkldnn._reorder_linear_weight(w, rows))
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, x.shape[-1]), packed, bias, "none", [], "")
        return out.reshape(*x.shape[:-1], shape[0])


class _Mode(TorchFunctionMode):
    def __init__(self, packed: PackedWeights):
        super().__init__()
        self.packed = packed

    def __exit__(self, *exc):
        try:
            if self.packed.in_place:
                self.packed.clear()  # every released weight back, exactly
        finally:
            super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d or func is F.linear:
            out = (self.packed.conv2d if func is F.conv2d else self.packed.linear_)(*args, **kwargs)
            if out is not None:
                return out
            # the plain kernel: give it the plain values of a released weight
            if "weight" in kwargs:
                kwargs = {**kwargs, "weight": self.packed.plain(kwargs["weight"])}
            elif len(args) > 1:
                args = (args[0], self.packed.plain(args[1]), *args[2:])
        return func(*args, **kwargs)

"""The valid range of every numeric generation argument, in one table that the Python API
(``Pipeline.__call__``, ``Control.check``, ``text_to_image``), the CLI (its argparse types) and the
server (its schemas' bounds and checks) all read. A value outside is a one-line ``ValueError``
naming the argument, the value and the range: ``steps: 0 is not an integer in [1, 1000]``.

Where other tools differ we chose finite, generous bounds: A1111's control weight slider stops
at 2 and diffusers takes any float, so ``scale`` is [0, 10]; A1111's CFG slider stops at 30, so
``guidance`` is [0, 100] (<= 1 turns classifier-free guidance off, as before). NaN and infinity
are never in range (NaN guidance used to give black images without an error).
"""

from __future__ import annotations

import math
import numbers
import secrets
from dataclasses import dataclass
from typing import Any

MAX_SEED = 2 ** 32 - 1  # A1111's seeds are 32-bit (torch's generators would take up to 2**64 - 1)
RANDOM_SEED = -1  # A1111's "random": a seed is drawn and recorded in the image's parameters
MAX_SIDE = 8192  # px per side, explicit or derived from a condition image's aspect (64 MP)


@dataclass(frozen=True)
class Range:
    lo: float
    hi: float
    integer: bool = False
    lo_open: bool = False  # (lo, hi] instead of [lo, hi]

    def describe(self) -> str:
        """'an integer in [1, 1000]', 'a number in (0, 1]'."""
        kind, fmt = ("an integer", "d") if self.integer else ("a number", "g")
        return f"{kind} in {'(' if self.lo_open else '['}{self.lo:{fmt}}, {self.hi:{fmt}}]"

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is a number of the right kind (no bools), finite and within the range."""
        kind = numbers.Integral if self.integer else numbers.Real
        if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
            return False
        return (self.lo < value if self.lo_open else self.lo <= value) and value <= self.hi


RANGES = {
    # more steps than a base's 1000 training timesteps is refused by the schedulers anyway
    "steps": Range(1, 1000, integer=True),
    "num_images": Range(1, 100, integer=True),  # per prompt, generated as one batch (A1111's batch count: 100)
    "width": Range(1, MAX_SIDE, integer=True),
    "height": Range(1, MAX_SIDE, integer=True),
    "guidance": Range(0, 100),
    "guidance_rescale": Range(0, 1),  # a mix of the rescaled and the plain prediction (arXiv 2305.08891)
    "strength": Range(0, 1, lo_open=True),  # img2img: the fraction of the steps that is redone
    "scale": Range(0, 10),
    "start": Range(0, 1),
    "end": Range(0, 1),
    "every": Range(1, 1000, integer=True),  # a ControlNet runs at every k-th of its steps (reuse in between)
    "seed": Range(RANDOM_SEED, MAX_SEED, integer=True),
}


def show(value: Any) -> str:
    """A value as an error message shows it: numbers plainly (nan, 1e+300), anything else as repr."""
    return str(value) if isinstance(value, numbers.Number) else repr(value)


def check(name: str, value: Any, where: str = "") -> Any:
    """``value`` when it is in ``RANGES[name]``, else a one-line ValueError (``where`` prefixes it)."""
    r = RANGES[name]
    if not r.contains(value):
        raise ValueError(f"{where + ': ' if where else ''}{name}: {show(value)} is not {r.describe()}")
    return value


def check_args(where: str = "", **values: Any) -> None:
    """``check`` each keyword argument that is not None (None: the default applies)."""
    for name, value in values.items():
        if value is not None:
            check(name, value, where)


def check_scale(scale: Any, where: str = "") -> None:
    """A control weight: one number, or one per residual (each in range)."""
    for s in scale if isinstance(scale, (list, tuple)) else [scale]:
        check("scale", s, where)


def check_seed(seed: Any, count: int = 1, random: bool = True) -> None:
    """``seed`` for ``count`` images (image i uses seed + i, so the last one must stay within
    MAX_SEED too); -1 (random) only where ``random`` (the caller then records the seed drawn)."""
    check("seed", seed)
    if seed == RANDOM_SEED and not random:
        raise ValueError("seed: -1 (random) needs a caller that reports the seed drawn (Pipeline does); "
                         f"give a seed in [0, {MAX_SEED}]")
    if seed != RANDOM_SEED and seed + count - 1 > MAX_SEED:
        raise ValueError(f"seed: {seed} with {count} images runs past {MAX_SEED} (image i uses seed + i); "
                         f"give a seed <= {MAX_SEED - count + 1}")


def resolve_seed(seed: int, count: int = 1) -> int:
    """The seed of the first of ``count`` images: ``seed``, or for -1 one drawn at random (from the
    OS, so the global torch / numpy generators are left alone) such that all ``count`` fit."""
    check_seed(seed, count)
    return secrets.randbelow(MAX_SEED - count + 2) if seed == RANDOM_SEED else seed

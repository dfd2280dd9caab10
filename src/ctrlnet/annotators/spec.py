"""A parameter's declared type and valid values (``Spec``), shared by every annotator module."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Spec:
    """A parameter's type and its valid values: numbers within [low, high] (inclusive), or one of
    ``choices`` for a string (no choices: any string, e.g. ``model``, a weight file's path)."""
    kind: type  # int, float, bool or str
    low: float = 0
    high: float = 0
    choices: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.kind is bool:
            return "true or false"
        if self.kind is str:
            return "one of " + ", ".join(self.choices) if self.choices else "a string (a path)"
        if self.kind is int:
            return f"an integer in [{int(self.low)}, {int(self.high)}]"
        return f"a number in [{self.low:g}, {self.high:g}]"

    def check(self, value: Any) -> Any:
        """``value`` as ``kind`` (an integral float is an int; an int is a float), or None when it is
        not a valid value."""
        if isinstance(value, np.generic):  # numpy scalars as Python ones (np.bool_ stays a bool)
            value = value.item()
        if self.kind is bool:
            return value if isinstance(value, bool) else None
        if self.kind is str:
            return value if isinstance(value, str) and (value in self.choices or not self.choices) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        if isinstance(value, int) and not self.low <= value <= self.high:
            return None  # before any float(): 10**400 has no float
        if not math.isfinite(value):
            return None
        if self.kind is int:
            if value != int(value):
                return None
            value = int(value)
        else:
            value = float(value)
        return value if self.low <= value <= self.high else None


# ``model``: a neural annotator's weight file or transformers folder ("" = look in the usual places,
# ``annotators.weights``). Never taken from a remote client (the server refers to weights by name).
MODEL = Spec(str)

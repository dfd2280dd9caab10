"""Invert (A1111's "invert (from white bg & black line)"): black lines on white become the white
lines on black that line-art / scribble ControlNets take."""

from __future__ import annotations

import numpy as np


def invert(image: np.ndarray) -> np.ndarray:
    return 255 - image

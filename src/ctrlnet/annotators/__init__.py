"""Annotators: ``image (H, W, 3) uint8 -> condition map (H, W, 3) uint8``, by name.

    from ctrlnet.annotators import get_annotator
    edges = get_annotator("canny", low=100, high=200)(image)
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .canny import canny

ANNOTATORS: dict[str, Callable[..., np.ndarray]] = {"canny": canny}


def get_annotator(name: str, **params) -> Callable[[np.ndarray], np.ndarray]:
    """The annotator ``name`` with ``params`` bound; a clear error for unknown names or parameters."""
    if name not in ANNOTATORS:
        raise ValueError(f"unknown annotator {name!r}; available: {', '.join(sorted(ANNOTATORS))}")
    fn = ANNOTATORS[name]
    import inspect
    accepted = set(inspect.signature(fn).parameters) - {"image"}
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ValueError(f"annotator {name!r}: unknown parameter(s) {unknown}; it accepts {sorted(accepted)}")
    return lambda image: fn(image, **params)

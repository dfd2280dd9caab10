"""Names a user may give instead of a path, resolved in one place for the CLI, the Python API,
the server, eval and training:

- base ``nano``: the bundled nano Stable Diffusion (``testbed/nano-sd``);
- ControlNet ``nano-canny`` (any bundled name): its folder under ``testbed/controlnets``;
- a ``ctrlnet train`` checkpoint folder (``run/checkpoints/step-000500``) is a path, recognised by
  ``is_training_checkpoint`` (``formats`` reads it).

A leaf module: it imports only the bundled paths, so every layer may use it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .testbed import NANO_SD, bundled_controlnets

NANO = "nano"


class UnknownName(ValueError):
    """Neither an existing path nor a bundled name; the message lists the names."""


def is_nano(spec: Any) -> bool:
    return isinstance(spec, (str, Path)) and str(spec) == NANO


def base_path(spec: str | Path) -> Path:
    """``nano`` -> the bundled base's folder; anything else is a path."""
    return NANO_SD if is_nano(spec) else Path(spec)


def controlnet_path(spec: str | Path) -> Path:
    """An existing path as is; a bundled name (``nano-canny``) -> its folder."""
    path = Path(spec)
    if path.exists():
        return path
    bundled = bundled_controlnets()
    if str(spec) in bundled:
        return bundled[str(spec)]
    raise UnknownName(f"{spec}: no such ControlNet file or folder, and not a bundled name "
                      f"({', '.join(bundled) or 'none bundled'})")


def is_training_checkpoint(path: Path) -> bool:
    """A ``ctrlnet train`` checkpoint folder (``step-N``: ``state.json`` + ``state.safetensors``)."""
    return path.is_dir() and (path / "state.json").is_file() and (path / "state.safetensors").is_file()

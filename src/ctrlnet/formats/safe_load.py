"""Reading weight files without running code from them.

Only safetensors, or ``torch.load(weights_only=True)`` for ``.pth``/``.ckpt``/``.bin``
pickles: a pickle that needs arbitrary code to load is refused, never executed.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


class CheckpointError(ValueError):
    """A weight file that cannot be used as asked; the message names the file and what to do."""


SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a weight file; Lightning's nested ``state_dict`` is unwrapped.

    Raises CheckpointError for a missing, truncated or unsafe file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix in SAFETENSORS_SUFFIXES:
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for bad headers/lengths
            raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None
        return tensors, metadata
    if path.suffix not in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: unknown weight file type {path.suffix!r}; expected .safetensors, "
                              f"{', '.join(PICKLE_SUFFIXES)}")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load: this pickle needs arbitrary code to unpickle, which ctrlnet never runs "
            f"({str(e).splitlines()[0] if str(e) else 'unsafe global'}). If you trust the file, convert it to "
            f".safetensors with code you trust, then load that.") from None
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read this checkpoint (truncated or not a PyTorch file?): "
                              f"{type(e).__name__}: {e}") from None
    return _tensors_only(obj, path), {}


def _tensors_only(obj, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # Lightning / original training checkpoints
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: contains no tensors")
    return tensors


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    """Atomic write: a crash never leaves a half-written file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    os.chmod(tmp, 0o644)  # safetensors writes 0600; a weight file is for other tools and users to read
    tmp.replace(path)


def read_config_json(path: str | Path, what: str) -> dict:
    """A model folder's config.json as a dict; a CheckpointError naming the file and ``what`` it configures."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read the {what} config: {e}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: the {what} config is not a JSON object")
    return raw


def write_model_folder(out: str | Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    """A diffusers model folder: ``diffusion_pytorch_model.safetensors`` and ``config.json``, each
    written atomically (the config last: a folder with a config has its weights)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(tensors, out / "diffusion_pytorch_model.safetensors", {"format": "pt"})
    tmp = out / "config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    tmp.replace(out / "config.json")
    return out


def json_field(path: str | Path, key: str, default: str) -> str:
    """One field of a small JSON file (a folder's config, a checkpoint's state), ``default`` when the file
    or the field is missing or unreadable: for telling kinds apart, never for loading."""
    try:
        value = json.loads(Path(path).read_text()).get(key, default)
    except (OSError, json.JSONDecodeError, AttributeError):
        return default
    return value if isinstance(value, str) else default

"""Training state on disk: atomic, exact, pickle-free, checksummed.

A checkpoint is a folder ``step-000500/`` holding the trainable weights and optimizer tensors as
safetensors (``state.safetensors``), every scalar (step, optimizer hyper-parameters, LR scheduler,
RNG states, the resolved config) as JSON (``state.json``), and ``manifest.json``: the size and
sha256 of each of those files. It is written under a temporary name and renamed into place, so a
run killed at any moment leaves either the whole checkpoint or none of it.

The manifest catches what the rename cannot: a file truncated or bit-rotted after it was written
(a full disk, a bad copy, a failing drive). ``verify_checkpoint`` checks it and names the bad
file in one line; ``newest_good_checkpoint`` is what ``--resume latest`` uses: the newest folder
that verifies, with the reasons the newer ones were passed over. sha256 (hashlib, no extra
dependency) reads about 0.8 GB/s on this project's slow CPU (2 GB/s with SHA extensions): hashing
a 5.8 GB SD1.5 checkpoint (weights, AdamW moments, EMA) adds seconds to a write that takes as long,
once every ``checkpointing_steps``. Folders written before checksums existed (no manifest) still
load; ``verify_checkpoint`` reports them as unverified.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from safetensors.torch import load_file

from ..models.controlnet import ControlNet, ControlNetConfig
from .safe_load import CheckpointError, write_safetensors

STEP_DIR = re.compile(r"^step-(\d+)$")
MANIFEST = "manifest.json"


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _files_sha256(files: dict) -> str:
    """The manifest's own checksum: a bit flipped in the manifest is then reported as the manifest's
    fault, not as a mismatch of the (intact) file it describes."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def save_state(path: Path, tensors: dict[str, torch.Tensor], state: dict) -> None:
    """Weights (safetensors), then the JSON state, then the manifest of both (sizes + sha256)."""
    write_safetensors(tensors, path / "state.safetensors")
    # "manifest" in state.json tells a deleted manifest apart from a checkpoint of an older version
    _write_text(path / "state.json", json.dumps({**state, "manifest": MANIFEST}))
    files = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(path.iterdir()) if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp")}
    _write_text(path / MANIFEST, json.dumps({"algorithm": "sha256", "files": files, "sha256": _files_sha256(files)},
                                            indent=1))


def verify_checkpoint(path: Path) -> bool:
    """Check every file of a checkpoint folder against its manifest: True when all match, False for
    a folder written before checksums existed (unverified). A one-line ``CheckpointError`` naming
    the file otherwise (missing, truncated, corrupted)."""
    path = Path(path)
    manifest_path, state_path = path / MANIFEST, path / "state.json"
    if not manifest_path.is_file():
        if not state_path.is_file():
            raise CheckpointError(f"{state_path}: missing")
        try:
            state = json.loads(state_path.read_text())
        except (ValueError, UnicodeDecodeError):
            raise CheckpointError(f"{state_path}: not valid JSON (truncated or corrupted)") from None
        if "manifest" in state:
            raise CheckpointError(f"{manifest_path}: missing")
        if not (path / "state.safetensors").is_file():
            raise CheckpointError(f"{path / 'state.safetensors'}: missing")
        return False
    try:
        manifest = json.loads(manifest_path.read_text())
        files, own = manifest["files"], manifest["sha256"]
        intact = own == _files_sha256(files)
    except (ValueError, UnicodeDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{manifest_path}: unreadable (truncated or corrupted)") from None
    if not intact:
        raise CheckpointError(f"{manifest_path}: checksum mismatch (truncated or corrupted)")
    for name, want in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing")
        size = file.stat().st_size
        if size != want["bytes"]:  # cheap, and says how much is gone
            raise CheckpointError(f"{file}: checksum mismatch (truncated or corrupted: {size} bytes, "
                                  f"{want['bytes']} written)")
        if file_sha256(file) != want["sha256"]:
            raise CheckpointError(f"{file}: checksum mismatch (truncated or corrupted)")
    return True


def flat(prefix: str, sd: dict) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in sd.items()}


def unflat(prefix: str, tensors: dict) -> dict[str, torch.Tensor]:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def optimizer_tensors(opt: torch.optim.Optimizer, name: str) -> tuple[dict, dict]:
    """Optimizer state as flat tensors (safetensors) + JSON-able scalars."""
    sd = opt.state_dict()
    tensors, scalars = {}, {"param_groups": sd["param_groups"], "state": {}}
    for idx, st in sd["state"].items():
        scalars["state"][str(idx)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{name}.{idx}.{k}"] = v
            else:
                scalars["state"][str(idx)][k] = v
    return tensors, scalars


def load_optimizer(opt: torch.optim.Optimizer, name: str, tensors: dict, scalars: dict) -> None:
    state = {int(idx): dict(st) for idx, st in scalars["state"].items()}
    for k, v in tensors.items():
        if k.startswith(name + "."):
            _, idx, key = k.split(".", 2)
            state.setdefault(int(idx), {})[key] = v
    opt.load_state_dict({"state": state, "param_groups": scalars["param_groups"]})


def rng_state() -> dict:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state().tolist(),
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "python": [version, list(internal), gauss]}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def checkpoint_dirs(folder: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``folder`` as (step, path), oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if (m := STEP_DIR.match(p.name)) and (p / "state.json").is_file()]
    return sorted(found)


def latest_checkpoint(folder: Path) -> Path | None:
    dirs = checkpoint_dirs(folder)
    return dirs[-1][1] if dirs else None


def newest_good_checkpoint(folder: Path) -> tuple[Path | None, bool, list[tuple[Path, str]]]:
    """(the newest ``step-N`` folder that verifies or None, whether it was verified (False: an older
    version's, without checksums), [(newer folder, why it failed)]). Every ``step-N`` folder is a
    candidate, with or without its state.json: the atomic rename only ever published whole ones,
    so a missing file is damage to report, not a half-written checkpoint to pass over silently."""
    candidates = sorted(((int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_DIR.match(p.name))
                         and p.is_dir()), reverse=True) if folder.is_dir() else []
    bad = []
    for _, path in candidates:
        try:
            return path, verify_checkpoint(path), bad
        except CheckpointError as e:
            bad.append((path, str(e)))
    return None, False, bad


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint to ``corrupt-step-N``: kept for a look, but no longer a checkpoint
    (not resumed from, not counted by ``checkpoints_total_limit``, not matched by ``step-*`` globs)."""
    aside = path.with_name("corrupt-" + path.name)
    shutil.rmtree(aside, ignore_errors=True)
    path.rename(aside)
    return aside


def write_checkpoint(folder: Path, step: int, tensors: dict[str, torch.Tensor], state: dict,
                     keep: int | None = None) -> Path:
    """Write ``folder/step-{step:06d}`` atomically (temp folder + rename); keep the last ``keep``."""
    final = folder / f"step-{step:06d}"
    tmp = folder / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_state(tmp, tensors, state)
    if final.exists():  # a re-run of the same step after a resume: replace it
        shutil.rmtree(final)
    tmp.rename(final)
    if keep:
        # Only this step and older ones count: folders of later steps (left by a run resumed from an
        # earlier checkpoint) are replaced as the run reaches them, and must not push this one out.
        done = [p for s, p in checkpoint_dirs(folder) if s <= step]
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(path: Path, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, state) of a checkpoint folder, checked against its manifest first (``verify``); a
    one-line ``CheckpointError`` naming the file when it is missing, truncated or corrupted."""
    path = Path(path)
    if verify:
        verify_checkpoint(path)
    try:
        tensors = load_file(path / "state.safetensors")
    except Exception as e:  # safetensors' own error types, or the file gone
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path / 'state.safetensors'}: not readable (truncated or corrupted?): {reason}") \
            from None
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{path / 'state.json'}: missing or not valid JSON (truncated or corrupted)") from None
    state.pop("manifest", None)
    return tensors, state


def controlnet_from_checkpoint(path: Path):
    """The ControlNet of a training checkpoint folder (``step-N``): its EMA weights when the run
    kept an EMA (what the final folder would hold), else the live weights."""
    tensors, state = read_checkpoint(Path(path))
    net = ControlNet(ControlNetConfig.from_dict(state["controlnet_config"]))
    net.load_state_dict(unflat("ema", tensors) or unflat("controlnet", tensors))
    return net

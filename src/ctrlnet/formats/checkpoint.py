"""Training state on disk: atomic, exact, pickle-free.

A checkpoint is a folder ``step-000500/`` holding the trainable weights and optimizer tensors as
safetensors and every scalar (step, optimizer hyper-parameters, LR scheduler, RNG states, the
resolved config) as JSON. It is written under a temporary name and renamed into place, so a run
killed at any moment leaves either the whole checkpoint or none of it.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from safetensors.torch import load_file

from ..models.controlnet import ControlNet, ControlNetConfig
from .safe_load import write_safetensors

STEP_DIR = re.compile(r"^step-(\d+)$")


def save_state(path: Path, tensors: dict[str, torch.Tensor], state: dict) -> None:
    """Atomic: weights (safetensors) + JSON state; the JSON, written last, marks the pair complete."""
    write_safetensors(tensors, path / "state.safetensors")
    tmp = path / "state.json.tmp"
    tmp.write_text(json.dumps(state))
    tmp.replace(path / "state.json")


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
        for _, old in checkpoint_dirs(folder)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    return load_file(path / "state.safetensors"), json.loads((path / "state.json").read_text())


def controlnet_from_checkpoint(path: Path):
    """The ControlNet of a training checkpoint folder (``step-N``): its EMA weights when the run
    kept an EMA (what the final folder would hold), else the live weights."""
    tensors, state = read_checkpoint(Path(path))
    net = ControlNet(ControlNetConfig.from_dict(state["controlnet_config"]))
    net.load_state_dict(unflat("ema", tensors) or unflat("controlnet", tensors))
    return net

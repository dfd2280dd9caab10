"""A neural annotator's weights: found offline where users already have them, loaded safely.

Nothing is ever downloaded. ``find(name, weights, model)`` returns the first of:

1. ``model`` (the annotator's ``model=PATH`` parameter): that file or folder, nothing else;
2. each folder in ``$CTRLNET_ANNOTATORS`` (``os.pathsep``-separated), then
   ``~/.cache/ctrlnet/annotators``: ``DIR/FILE``, ``DIR/<org>/<repo>/FILE`` (the layout of
   comfyui_controlnet_aux's ``ckpts``), ``DIR/<repo>/FILE`` and ``DIR/*/FILE`` (the A1111
   extension's ``annotator/downloads/<module>/FILE``);
3. the Hugging Face hub cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
   ``~/.cache/huggingface/hub``): ``models--<org>--<repo>/snapshots/<revision>/FILE``, the
   revision ``refs/main`` names first, then the newest.

A transformers model (``Weights.file == ""``) is a folder holding ``config.json``, found the same
way (``DIR/<repo>``, ``DIR/<org>/<repo>``, the snapshot folder). A missing file is a
``WeightsNotFound`` (a ``FileNotFoundError``) whose one line names the file, every place searched
and where the file is published.

``read_state_dict`` opens ``.safetensors`` files and PyTorch pickles with ``weights_only=True``
only (a pickle holding code is refused, never run); ``load_strict`` checks every key and shape
against the module before anything is assigned, so a file made for another detector is an error
naming the file and what was expected, and nothing is half-loaded. ``cached`` keeps the last few
loaded detectors (keyed by file, its size and mtime, device and dtype) so a batch or a server loads
each once.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file


class WeightsNotFound(FileNotFoundError):
    """A detector's weights are nowhere they were looked for (the message says where)."""


class WeightsError(ValueError):
    """A weight file or folder that cannot be used: truncated, unsafe, or made for another model."""


@dataclass(frozen=True)
class Weights:
    """One weight file or transformers folder a detector needs.

    ``file``: its file name (``"ControlNetHED.pth"``), or ``""`` for a transformers model folder.
    ``repos``: the Hugging Face repositories that publish it, in order of preference (any one will
    do: ``("depth-anything/Depth-Anything-V2-Small-hf", "depth-anything/Depth-Anything-V2-Base-hf")``).
    ``what``: what it is, for messages (``"the HED soft-edge network"``)."""
    file: str
    repos: tuple[str, ...]
    what: str

    @property
    def folder(self) -> bool:
        return not self.file

    def describe(self) -> str:
        return self.file or f"a {self.repos[0]} folder"


ANNOTATORS_DIR = Path("~/.cache/ctrlnet/annotators")


def search_dirs() -> list[Path]:
    """``$CTRLNET_ANNOTATORS`` (each folder) then ``~/.cache/ctrlnet/annotators``."""
    env = os.environ.get("CTRLNET_ANNOTATORS", "")
    return [Path(p).expanduser() for p in env.split(os.pathsep) if p] + [ANNOTATORS_DIR.expanduser()]


def hub_cache() -> Path:
    """The Hugging Face hub cache folder, as huggingface_hub finds it (``HF_HUB_CACHE``, ``HF_HOME``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def snapshots(repo: str) -> list[Path]:
    """The snapshot folders of ``repo`` in the hub cache: the one ``refs/main`` names, then newest first."""
    root = hub_cache() / ("models--" + repo.replace("/", "--"))
    folders = sorted((root / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime, reverse=True) \
        if (root / "snapshots").is_dir() else []
    main = root / "refs" / "main"
    if main.is_file():
        head = root / "snapshots" / main.read_text().strip()
        folders = [head] + [f for f in folders if f != head]
    return [f for f in folders if f.is_dir()]


def _usable(path: Path, weights: Weights) -> bool:
    return (path / "config.json").is_file() if weights.folder else path.is_file()


def candidates(weights: Weights) -> list[Path]:
    """Every path ``find`` tries for ``weights``, in order (without ``model``)."""
    out = []
    for d in search_dirs():
        if weights.folder:
            out += [p for r in weights.repos for p in (d / r, d / r.split("/")[-1])]
        else:
            out += [d / weights.file] + [p for r in weights.repos for p in (d / r / weights.file,
                                                                            d / r.split("/")[-1] / weights.file)]
            out += sorted(d.glob("*/" + weights.file)) if d.is_dir() else []
    for repo in weights.repos:
        out += [s if weights.folder else s / weights.file for s in snapshots(repo)]
    return list(dict.fromkeys(out))


def searched(weights: Weights) -> list[str]:
    """The places searched, as a message names them."""
    places = [str(d) for d in search_dirs()]
    if not os.environ.get("CTRLNET_ANNOTATORS"):
        places.insert(0, "$CTRLNET_ANNOTATORS (unset)")
    places += [str(hub_cache() / ("models--" + r.replace("/", "--"))) for r in weights.repos]
    return places


def find(name: str, weights: Weights, model: str | os.PathLike = "") -> Path:
    """The file or folder holding ``weights`` for annotator ``name``: ``model`` when given (it must
    exist), else the first of ``candidates``; ``WeightsNotFound`` otherwise."""
    if model:
        path = Path(model).expanduser()
        if not path.exists():
            raise WeightsNotFound(f"annotator {name!r}: model={str(model)!r} does not exist (expected "
                                  f"{weights.describe()}, {weights.what})")
        if weights.folder and not (path / "config.json").is_file():
            raise WeightsError(f"annotator {name!r}: model={str(model)!r} is not a transformers model folder "
                               f"(no config.json); expected {weights.what}, e.g. {weights.repos[0]}")
        if not weights.folder and path.is_dir():
            if (path / weights.file).is_file():
                return path / weights.file
            raise WeightsNotFound(f"annotator {name!r}: model={str(model)!r} is a folder without {weights.file}")
        return path
    for path in candidates(weights):
        if _usable(path, weights):
            return path
    published = ", ".join(f"https://huggingface.co/{r}" for r in weights.repos)
    raise WeightsNotFound(f"annotator {name!r}: {weights.describe()} ({weights.what}) not found; searched "
                          f"{'; '.join(searched(weights))}; it is published at {published} - put it in one of "
                          f"these places or pass model=PATH (nothing is downloaded)")


def locate(weights: Weights) -> Path | None:
    """Where ``weights`` would be found now (no ``model``), or None."""
    return next((p for p in candidates(weights) if _usable(p, weights)), None)


# A detector's need: one Weights, or a tuple of alternatives any one of which will do (MiDaS: the
# original .pt or a transformers folder).
Need = Weights | tuple[Weights, ...]


def options(need: Need) -> tuple[Weights, ...]:
    return need if isinstance(need, tuple) else (need,)


def find_any(name: str, need: Need, model: str | os.PathLike = "") -> Path:
    """``find`` for the first of ``need``'s alternatives that is present (``model``, when given,
    must be one of them: the first alternative whose kind, file or folder, it matches)."""
    alternatives = options(need)
    if model:
        folder = Path(model).expanduser().is_dir() and (Path(model).expanduser() / "config.json").is_file()
        w = next((w for w in alternatives if w.folder == folder), alternatives[0])
        return find(name, w, model)
    found = locate_any(need)
    if found is not None:
        return found
    try:
        return find(name, alternatives[0])
    except WeightsNotFound as e:
        others = "; ".join(f"{w.describe()} ({', '.join(w.repos)})" for w in alternatives[1:])
        raise WeightsNotFound(f"{e}" + (f"; any of these would do instead, looked for in the same places: {others}"
                                        if others else "")) from None


def _place(path: Path) -> int:
    """Which search place ``path`` lies in: the index in ``search_dirs()``, after them the hub cache."""
    dirs = search_dirs()
    return next((i for i, d in enumerate(dirs) if path.is_relative_to(d)), len(dirs))


def locate_any(need: Need) -> Path | None:
    """Where the first of ``need``'s alternatives would be found, place by place (an alternative in
    ``$CTRLNET_ANNOTATORS`` before another in the hub cache), alternatives in order within a place."""
    found = [(p, k) for k, w in enumerate(options(need)) if (p := locate(w)) is not None]
    return min(found, key=lambda pk: (_place(pk[0]), pk[1]))[0] if found else None


# --- loading ---------------------------------------------------------------------------------

def read_state_dict(path: str | os.PathLike, name: str, what: str) -> dict[str, torch.Tensor]:
    """The tensors of weight file ``path`` (``.safetensors``, or a PyTorch file read with
    ``weights_only=True``), unwrapped from a ``state_dict`` / ``model`` entry when the file nests
    them; a ``WeightsError`` naming the file for a truncated, unreadable or unsafe file."""
    path = Path(path)
    where = f"annotator {name!r}: {path}"
    try:
        if path.suffix == ".safetensors":
            state: Any = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Weights only load failed" in str(e):
            raise WeightsError(f"{where} holds pickled objects other than tensors; refused (only weights_only "
                               f"loading is allowed) - convert it to .safetensors from a trusted copy") from None
        raise WeightsError(f"{where} is not a readable PyTorch file ({type(e).__name__}); expected {what}") from None
    except (SafetensorError, RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        detail = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise WeightsError(f"{where} could not be read (truncated or not a weight file: {detail}); expected "
                           f"{what}") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict) and \
                not any(isinstance(v, torch.Tensor) for v in state.values()):
            state = state[key]
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{where} holds no tensors; expected {what}")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def strip_prefix(state: dict[str, torch.Tensor], prefix: str = "module.") -> dict[str, torch.Tensor]:
    """``state`` without ``prefix`` when every key has it (DataParallel's ``module.``)."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def _examples(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:3]) + (f", ... ({len(keys)} in all)" if len(keys) > 3 else "")


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike, name: str,
                what: str) -> torch.nn.Module:
    """``module`` (in eval mode) with ``state`` loaded, every key and shape checked first: a
    ``WeightsError`` naming ``path`` and ``what`` was expected when the file was made for another
    network, before any weight is assigned."""
    expected = module.state_dict()
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    shapes = [k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of its {len(expected)} weights missing ({_examples(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unknown ({_examples(unexpected)})")
        if shapes:
            k = sorted(shapes)[0]
            parts.append(f"{len(shapes)} of other shapes ({k}: {tuple(state[k].shape)} in the file, "
                         f"{tuple(expected[k].shape)} expected)")
        raise WeightsError(f"annotator {name!r}: {path} is not {what}: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)
    return module.eval()


def check_folder(folder: str | os.PathLike, name: str, model_types: tuple[str, ...], what: str) -> dict:
    """The ``config.json`` of transformers folder ``folder``, checked to be one of ``model_types``
    (its ``model_type``); a ``WeightsError`` naming the folder, what it is and what was expected."""
    config = Path(folder) / "config.json"
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"annotator {name!r}: {config} could not be read ({type(e).__name__}); expected "
                           f"{what}") from None
    if data.get("model_type") not in model_types:
        raise WeightsError(f"annotator {name!r}: {folder} holds a {data.get('model_type')!r} model "
                           f"({', '.join(data.get('architectures') or []) or 'no architectures'}); expected {what} "
                           f"(model_type {' or '.join(model_types)})")
    return data


# --- device and cache ------------------------------------------------------------------------

def device() -> torch.device:
    """Where detectors run: ``$CTRLNET_ANNOTATOR_DEVICE`` when set, else CUDA when present, else CPU."""
    if os.environ.get("CTRLNET_ANNOTATOR_DEVICE"):
        return torch.device(os.environ["CTRLNET_ANNOTATOR_DEVICE"])
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


CACHE_SIZE = 4  # detectors kept loaded (a batch or a server switching between a few)
_cache: OrderedDict[tuple, Any] = OrderedDict()


def cached(path: str | os.PathLike, kind: str, build: Callable[[], Any], **key) -> Any:
    """``build()`` once per (``kind``, ``path`` with its size and mtime - a folder's files' -, ``key``,
    device): the loaded detector is kept (the last ``CACHE_SIZE``), so a batch or a server loads a
    file once. A file replaced on disk is loaded again."""
    path = Path(path)
    # a transformers folder changes when a file in it does (its own mtime does not follow a file
    # overwritten in place): its files' sizes and mtimes are the key
    files = sorted(f for f in path.iterdir() if f.is_file()) if path.is_dir() else [path]
    stats = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    full = (kind, str(path.resolve()), stats, str(device()), tuple(sorted(key.items())))
    if full in _cache:
        _cache.move_to_end(full)
        return _cache[full]
    value = build()  # raises before anything is stored: nothing half-loaded is kept
    _cache[full] = value
    while len(_cache) > CACHE_SIZE:
        _cache.popitem(last=False)
    return value


def clear_cache() -> None:
    _cache.clear()

"""Loading a locked base model (UNet, VAE, text encoder(s), tokenizer(s), scheduler), offline.

Two layouts:

- a diffusers pipeline folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
  ``tokenizer/``, ``scheduler/``; SDXL adds ``text_encoder_2/`` and ``tokenizer_2/``), the
  layout of the bundled nano model too;
- a single-file Stable Diffusion checkpoint (``.safetensors`` / ``.ckpt``, CompVis / SGM
  keys). Its architecture (sd15, sd21, sdxl) is detected from the keys and built from the
  configs shipped in ``ctrlnet/configs/`` (nothing is fetched from a hub). A single file
  holds no tokenizer: the CLIP BPE files every SD 1.x / 2.x / SDXL text encoder reads are
  shipped (``configs/clip-bpe/``, built offline by ``scripts/build_clip_tokenizer.py``), with
  each family's padding token. ``tokenizer=`` (a tokenizer folder) or ``config_dir=`` (a
  diffusers-layout folder with the configs and tokenizer to use) override them.

Models are built on the meta device (no random initialisation, no second copy of the weights)
and the checkpoint's tensors are assigned straight into them; a folder's parts load through
diffusers' / transformers' own low-memory loading.

Every part comes back locked: ``requires_grad=False`` and eval mode.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_vae_checkpoint,
                                                 convert_open_clip_checkpoint)
from accelerate import init_empty_weights
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .configs import CONFIGS_DIR, classify_unet
from .formats.keymap import build_keymap
from .formats.safe_load import CheckpointError, read_state_dict
from .models.control import lock
from .names import base_path


class BaseLoadError(CheckpointError):
    pass


@dataclass
class LockedBase:
    """A locked text-to-image base: what a ControlNet is attached to."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    kind: str  # sd15 / sd21 / sdxl / custom
    source: str
    text_encoder_2: Any = None
    tokenizer_2: Any = None

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    def parts(self) -> dict[str, Any]:
        return {k: v for k, v in [("unet", self.unet), ("vae", self.vae), ("text_encoder", self.text_encoder),
                                  ("text_encoder_2", self.text_encoder_2)] if v is not None}

    def to(self, device=None, dtype=None) -> "LockedBase":
        for part in self.parts().values():
            part.to(device=device, dtype=dtype)
        return self


SHIPPED_BPE = CONFIGS_DIR / "clip-bpe"  # vocab.json + merges.txt of OpenAI CLIP's BPE
CLIP_CONTEXT = 77
# How each family's text encoders saw padding (it changes the hidden states the UNet attends to):
# SD 1.x pads with <|endoftext|>; SD 2.x (OpenCLIP) and SDXL's second encoder pad with id 0, as
# ``open_clip.tokenize`` does. (first tokenizer, second tokenizer)
PADDING = {"sd15": ("eot", None), "sd21": ("zero", None), "sdxl": ("eot", "zero")}


class ZeroPaddedCLIPTokenizer(CLIPTokenizer):
    """CLIP's tokenizer padding with id 0 after <|endoftext|>, as ``open_clip.tokenize`` does. (A
    ``pad_token="!"`` tokenizer, the diffusers layout, pads with 0 too, but also splits every "!" of
    a prompt out as padding; here "!!!" stays the token OpenCLIP was trained with.)"""

    @property
    def pad_token_id(self) -> int:
        return 0


def check_tokenizer(tokenizer, where: str):
    size = len(tokenizer)  # an offline CLIPTokenizer with no files loads with a vocabulary of 2
    if size <= 2:
        raise BaseLoadError(f"{where}: the tokenizer loaded EMPTY (vocabulary of {size}): its vocab.json / "
                            "merges.txt are missing. Point to a folder with the tokenizer files.")
    return tokenizer


def load_tokenizer(folder: str | Path):
    """A CLIP tokenizer from a folder: ``vocab.json`` + ``merges.txt``, or only ``tokenizer.json``
    (what transformers 5 saves)."""
    folder = Path(folder)
    has_bpe = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    if not has_bpe and not (folder / "tokenizer.json").is_file():
        raise BaseLoadError(f"{folder}: no tokenizer here (expected vocab.json + merges.txt, or tokenizer.json)")
    try:
        tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise BaseLoadError(f"{folder}: cannot load the tokenizer: {e}") from None
    return check_tokenizer(tok, str(folder))


def shipped_tokenizer(padding: str = "eot"):
    """OpenAI CLIP's tokenizer from the files shipped with ctrlnet (77-token context), padding with
    <|endoftext|> (``"eot"``, SD 1.x) or id 0 (``"zero"``, OpenCLIP)."""
    cls = ZeroPaddedCLIPTokenizer if padding == "zero" else CLIPTokenizer
    return cls(vocab=str(SHIPPED_BPE / "vocab.json"), merges=str(SHIPPED_BPE / "merges.txt"),
               model_max_length=CLIP_CONTEXT)


def check_vocabulary(tokenizer, text_encoder, where: str) -> None:
    """A tokenizer whose ids the text encoder cannot embed fails at the first prompt; say so now."""
    rows = text_encoder.config.vocab_size
    if len(tokenizer) > rows:
        raise BaseLoadError(f"{where}: the tokenizer has {len(tokenizer)} tokens but the text encoder embeds "
                            f"{rows}; pass the tokenizer made for this model (tokenizer=DIR / --tokenizer DIR)")


def _scheduler_from_config(config: dict, prediction_type: str | None = None):
    config = dict(config)
    cls_name = config.get("_class_name", "DDIMScheduler")
    cls = getattr(diffusers, cls_name, None)
    if cls is None:
        raise BaseLoadError(f"unknown scheduler class {cls_name!r} in the scheduler config")
    if prediction_type:
        config["prediction_type"] = prediction_type
    return cls.from_config(config)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BaseLoadError(f"{path}: cannot read: {e}") from None


def quiet_libraries():
    """diffusers/transformers print progress bars and advice on every load; ours is a CLI."""
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_base(path: str | Path, dtype: torch.dtype = torch.float32, tokenizer: str | Path | None = None,
              config_dir: str | Path | None = None, prediction_type: str | None = None) -> LockedBase:
    """Load a base model from a diffusers folder or a single-file checkpoint (see module doc);
    ``nano`` names the bundled nano base."""
    quiet_libraries()
    path = base_path(path)
    if path.is_dir():
        base = _load_diffusers_folder(path, prediction_type)
    elif path.is_file():
        base = _load_single_file(path, tokenizer, config_dir, prediction_type)
    else:
        raise BaseLoadError(f"{path}: no such base model folder or file")
    base.to(dtype=dtype)  # every part: a single file's parts keep the dtypes they were stored in
    for part in base.parts().values():
        lock(part)
    return base


def _load_diffusers_folder(path: Path, prediction_type: str | None) -> LockedBase:
    index = _read_json(path / "model_index.json") if (path / "model_index.json").is_file() else None
    if index is None:
        raise BaseLoadError(f"{path}: not a diffusers pipeline folder (no model_index.json)")
    for part in ("unet", "text_encoder", "tokenizer", "scheduler"):
        if not (path / part).is_dir():
            raise BaseLoadError(f"{path}: missing the {part}/ folder of a diffusers pipeline")
    try:
        unet = UNet2DConditionModel.from_pretrained(str(path / "unet"), local_files_only=True)
        vae = AutoencoderKL.from_pretrained(str(path / "vae"), local_files_only=True) if (path / "vae").is_dir() else None
        text_encoder = CLIPTextModel.from_pretrained(str(path / "text_encoder"), local_files_only=True)
        text_encoder_2 = tokenizer_2 = None
        if (path / "text_encoder_2").is_dir():
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(str(path / "text_encoder_2"),
                                                                         local_files_only=True)
            tokenizer_2 = load_tokenizer(path / "tokenizer_2")
    except (OSError, ValueError) as e:
        raise BaseLoadError(f"{path}: cannot load the base model: {e}") from None
    scheduler_cfg = path / "scheduler" / "scheduler_config.json"
    scheduler = _scheduler_from_config(_read_json(scheduler_cfg), prediction_type)
    return LockedBase(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=load_tokenizer(path / "tokenizer"),
                     scheduler=scheduler, kind=classify_unet(dict(unet.config)), source=str(path),
                     text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)


def detect_single_file_kind(keys) -> str:
    keys = list(keys)
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        raise BaseLoadError("not a single-file Stable Diffusion checkpoint: no model.diffusion_model.* keys")
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd21"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd15"
    raise BaseLoadError("single-file checkpoint without a recognised text encoder "
                        "(cond_stage_model.transformer / cond_stage_model.model / conditioner.embedders)")


def unet_from_original(checkpoint: dict[str, torch.Tensor], unet_config: dict, source: str):
    """A diffusers UNet from ``model.diffusion_model.*`` tensors, every key accounted for; built on
    the meta device and the tensors assigned into it (no random init, no copy)."""
    prefix = "model.diffusion_model."
    original = {k[len(prefix):]: v for k, v in checkpoint.items() if k.startswith(prefix)}
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_config)
    own = unet.state_dict()  # meta tensors: names and shapes only
    keymap = build_keymap(own.keys(), unet.config.layers_per_block)
    inverse = {o: d for d, o in keymap.items()}
    missing = [o for o in inverse if o not in original]
    unexpected = [k for k in original if k not in inverse]
    mismatched = [k for k, d in inverse.items() if k in original and original[k].numel() != own[d].numel()]
    if missing or unexpected or mismatched:
        raise BaseLoadError(f"{source}: UNet weights do not fit the UNet config: "
                            f"missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatch {mismatched[:5]}")
    unet.load_state_dict({d: original[o].reshape(own[d].shape) for o, d in inverse.items()}, strict=True, assign=True)
    return unet


def _load_strict(module, tensors: dict, source: str, what: str):
    """Assign ``tensors`` into a meta-built ``module``; every weight must be there."""
    own = module.state_dict()
    if not any(k.startswith("text_model.") for k in own):
        # transformers 5 names CLIPTextModel weights without the classic "text_model." prefix
        tensors = {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in tensors.items()}
    # position_ids is a buffer some transformers versions keep and others drop: keep the module's
    tensors = {k: v for k, v in tensors.items() if not k.endswith("position_ids")}
    result = module.load_state_dict(tensors, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        raise BaseLoadError(f"{source}: {what} weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")


def _single_file_tokenizers(path: Path, kind: str, tokenizer, cfg_dir: Path, text_encoder, text_encoder_2):
    """(tokenizer, tokenizer_2): ``tokenizer=DIR``, else the config folder's, else the shipped files,
    each with the family's padding token where none is given."""
    pad, pad_2 = PADDING.get(kind, ("eot", "zero"))
    folder = Path(tokenizer) if tokenizer else cfg_dir / "tokenizer" if (cfg_dir / "tokenizer").is_dir() else None
    if folder is None:
        tok = shipped_tokenizer(pad)
        tok_2 = shipped_tokenizer(pad_2) if text_encoder_2 is not None else None
        where = f"{path} (with ctrlnet's shipped CLIP tokenizer)"
    else:
        if not folder.is_dir():
            raise BaseLoadError(f"{folder}: no such tokenizer folder (tokenizer=DIR / --tokenizer DIR)")
        tok = load_tokenizer(folder)
        tok_2 = None
        if text_encoder_2 is not None:
            second = folder.parent / "tokenizer_2"
            tok_2 = load_tokenizer(second if second.is_dir() else folder)
        where = f"{path} with the tokenizer in {folder}"
    check_vocabulary(tok, text_encoder, where)
    if tok_2 is not None:
        check_vocabulary(tok_2, text_encoder_2, where)
    return tok, tok_2


def _load_single_file(path: Path, tokenizer, config_dir, prediction_type) -> LockedBase:
    checkpoint, _ = read_state_dict(path)
    kind = detect_single_file_kind(checkpoint)
    cfg_dir = Path(config_dir) if config_dir else CONFIGS_DIR / kind
    unet_config = _read_json(cfg_dir / "unet" / "config.json")
    vae_config = _read_json(cfg_dir / "vae" / "config.json")
    unet = unet_from_original(checkpoint, unet_config, str(path))
    with init_empty_weights():
        vae = AutoencoderKL.from_config(vae_config)
    _load_strict(vae, convert_ldm_vae_checkpoint(checkpoint, vae_config), str(path), "VAE")

    te_config = CLIPTextConfig.from_dict(_read_json(cfg_dir / "text_encoder" / "config.json"))
    text_encoder_2 = None
    with init_empty_weights():
        text_encoder = CLIPTextModel(te_config)
    if kind == "sd21":
        tensors = convert_open_clip_checkpoint(text_encoder, checkpoint, prefix="cond_stage_model.model.")
        tensors.pop("text_projection.weight", None)  # CLIPTextModel has no projection
    else:
        tensors = convert_ldm_clip_checkpoint(checkpoint)
    _load_strict(text_encoder, tensors, str(path), "text encoder")
    if kind == "sdxl":
        te2_config = CLIPTextConfig.from_dict(_read_json(cfg_dir / "text_encoder_2" / "config.json"))
        with init_empty_weights():
            text_encoder_2 = CLIPTextModelWithProjection(te2_config)
        tensors = convert_open_clip_checkpoint(text_encoder_2, checkpoint, prefix="conditioner.embedders.1.model.")
        _load_strict(text_encoder_2, tensors, str(path), "second text encoder")
    del checkpoint, tensors  # the models now hold the tensors they need; free the rest

    tok, tokenizer_2 = _single_file_tokenizers(path, kind, tokenizer, cfg_dir, text_encoder, text_encoder_2)
    scheduler = _scheduler_from_config(_read_json(cfg_dir / "scheduler" / "scheduler_config.json"), prediction_type)
    return LockedBase(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tok, scheduler=scheduler,
                     kind=classify_unet(unet_config), source=str(path), text_encoder_2=text_encoder_2,
                     tokenizer_2=tokenizer_2)

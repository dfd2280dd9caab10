"""The training configuration: one dataclass, documented defaults, YAML or TOML files,
``--set key=value`` overrides. The resolved config is saved with every checkpoint.

Defaults follow the original ControlNet repository (its tutorial_train.py and cldm_v15.yaml): AdamW lr 1e-5,
batch 4, fp32, no LR schedule, no EMA; plus the paper's 50% empty prompts, which the original
code never implemented.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..configs import shipped_train_configs


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, bad resume folder); says what to do."""


@dataclass
class TrainConfig:
    # --- what to train on
    base: str = "nano"  # "nano" (bundled), a diffusers pipeline folder, or a single-file SD1.x/2.x/XL checkpoint
    data: str = ""  # fill50k folder/prompt file, imagefolder (metadata.jsonl), or an HF dataset saved to disk
    validation_data: str = ""  # same formats; "" = no controllability monitor, only the loss
    output_dir: str = "runs/controlnet"
    # --- data columns (imagefolder / HF datasets; fill50k files use source/target/prompt)
    image_column: str = "file_name"  # HF datasets: "image"
    conditioning_image_column: str = "conditioning_image"
    caption_column: str = "text"
    max_train_samples: int = 0  # use only the first N records (0 = all)
    annotator: str = ""  # extract the condition from the target on the fly (e.g. "canny"); "" = given
    annotator_params: dict = field(default_factory=dict)
    # --- images: resize the short side to `resolution`, then crop a square (center or random);
    # the same resize, crop and flip are applied to image and condition
    resolution: int = 512
    center_crop: bool = True
    random_flip: bool = False
    skip_bad: bool = False  # unreadable/missing images: False = stop naming the file; True = skip and count
    # --- the ControlNet
    controlnet: str = ""  # "" = initialise from the base UNet's encoder (the seed); or a checkpoint to continue
    conditioning_channels: int = 3
    hint_channels: list = field(default_factory=lambda: [16, 32, 96, 256])
    # --- the procedure
    proportion_empty_prompts: float = 0.5  # the paper's 50% "" prompts; 0 disables
    # uniform (the seed) or cubic: t = (1 - u^3) T, most steps at high noise where the layout is
    # decided and the condition carries the most information (T2I-Adapter, arXiv 2302.08453, sec. 3.4)
    timestep_sampling: str = "uniform"
    # optimizer step from which timestep_sampling applies, uniform before it: a bias towards high
    # noise delays the sudden convergence (BENCHMARKS.md), so it can start after it
    timestep_sampling_from: int = 0
    # Min-SNR-gamma loss weighting (Hang et al., arXiv 2303.09556): each sample's loss times
    # min(SNR, gamma) / SNR (epsilon) or / (SNR + 1) (v-prediction), which lowers the weight of
    # low-noise steps (for v-prediction also of the noisiest ones); 0 = off (plain MSE, the
    # original's), 5 is the paper's value
    snr_gamma: float = 0.0
    learning_rate: float = 1e-5
    lr_warmup_steps: int = 0  # linear warmup, then lr_scheduler
    lr_scheduler: str = "constant"  # constant (the original's) or cosine: decays to 0 at max_train_steps
    # EMA of the ControlNet weights (0 = off, the original's default); validation and the final
    # folder use the EMA weights. Decay warms up as min(ema_decay, (1 + s) / (10 + s)) (diffusers' EMAModel).
    ema_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0  # 0 = no clipping
    train_batch_size: int = 4  # per process
    gradient_accumulation_steps: int = 1
    max_train_steps: int = 10000  # optimizer steps
    max_train_minutes: float = 0.0  # also stop (with a checkpoint) once this wall time is used; 0 = no limit
    seed: int = 0
    # --- speed
    mixed_precision: str = "no"  # no / bf16 / fp16 (the locked base runs in that dtype; ControlNet weights stay fp32)
    gradient_checkpointing: bool = False
    cpu: bool = False  # train on the CPU even when a GPU is present
    cache: bool = True  # VAE latents and text embeddings computed once, stored under cache_dir
    cache_dir: str = ""  # "" = output_dir/cache; share one folder between runs on the same images and base
    retain_cpu_memory: bool = True  # training on the CPU: keep freed memory for reuse (glibc; ctrlnet.allocator)
    # --- never lose work
    checkpointing_steps: int = 500
    checkpoints_total_limit: int = 3
    # --- watching convergence
    log_every: int = 10
    validation_steps: int = 500
    num_validation_samples: int = 16  # controllability is measured on this many held-out conditions
    validation_inference_steps: int = 20
    validation_guidance: float = 2.5  # nano; SD1.5 users want ~7.5
    validation_guidance_rescale: float = 0.7  # for zero-terminal-SNR bases; 0 for SD1.5
    tensorboard: bool = True  # also log to TensorBoard when it is installed

    def validate(self) -> "TrainConfig":
        if not self.base:
            raise ValueError("config: 'base' is empty; set it to nano, a diffusers folder or a checkpoint file "
                             "(--set base=PATH)")
        if not self.data:
            raise ValueError("config: 'data' is empty; set it to a data folder (--set data=DIR)")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"config: mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.lr_scheduler not in ("constant", "cosine"):
            raise ValueError(f"config: lr_scheduler must be constant or cosine, got {self.lr_scheduler!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"config: ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.timestep_sampling not in ("uniform", "cubic"):
            raise ValueError(f"config: timestep_sampling must be uniform or cubic, got {self.timestep_sampling!r}")
        if self.snr_gamma < 0:
            raise ValueError(f"config: snr_gamma must be >= 0 (0 = off), got {self.snr_gamma}")
        if self.timestep_sampling_from < 0:
            raise ValueError(f"config: timestep_sampling_from must be >= 0, got {self.timestep_sampling_from}")
        if not 0 <= self.proportion_empty_prompts <= 1:
            raise ValueError(f"config: proportion_empty_prompts must be in [0, 1], got {self.proportion_empty_prompts}")
        for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "resolution",
                     "checkpointing_steps", "log_every", "validation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"config: {name} must be >= 1, got {getattr(self, name)}")
        if self.cache and not self.center_crop:
            raise ValueError("config: random crops (center_crop: false) need cache: false - the cache stores one "
                             "crop per image")
        if self.resolution % 8:
            raise ValueError(f"config: resolution must be a multiple of 8, got {self.resolution}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _coerce(key: str, value: Any, kind) -> Any:
    """A value from a file or the command line, converted to the field's type."""
    if isinstance(value, str) and kind is not str:
        text = value.strip()
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"config: {key} expects true/false, got {value!r}")
        if kind in (list, dict):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                if kind is dict:
                    raise ValueError(f"config: {key} expects a JSON object, e.g. {key}='{{\"low\": 100}}'") from None
                value = [v.strip() for v in text.split(",") if v.strip()]
        else:
            try:
                return kind(text)
            except ValueError:
                raise ValueError(f"config: {key} expects {kind.__name__}, got {value!r}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind is list and isinstance(value, tuple):
        value = list(value)
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        raise ValueError(f"config: {key} expects {kind.__name__}, got {value!r} ({type(value).__name__})")
    return value


def from_dict(values: dict[str, Any], source: str = "config") -> TrainConfig:
    types = _field_types()
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(types)}")
    return TrainConfig(**{k: _coerce(k, v, types[k]) for k, v in values.items()})


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text()
    if path.suffix == ".toml":
        import tomllib
        values = tomllib.loads(text)
    elif path.suffix in (".yaml", ".yml", ".json"):
        values = yaml.safe_load(text) or {}
    else:
        raise ValueError(f"{path}: config files are .yaml, .yml, .toml or .json")
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of config keys at the top level")
    return values


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> TrainConfig:
    """A config file (optional) with ``key=value`` overrides applied on top, validated."""
    values = read_config_file(path) if path else {}
    source = str(path) if path else "config"
    if isinstance(overrides, dict):
        values.update(overrides)
    else:
        for item in overrides or []:
            if "=" not in item:
                raise ValueError(f"--set expects key=value, got {item!r}")
            key, value = item.split("=", 1)
            values[key.strip()] = value
    return from_dict(values, source).validate()


def save_config(config: TrainConfig, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    tmp.replace(path)


def resolve_config_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_train_configs()
    if name_or_path in shipped:
        return shipped[name_or_path]
    raise FileNotFoundError(f"config {name_or_path!r}: no such file, and not a shipped config "
                            f"(shipped: {', '.join(shipped) or 'none'})")

"""The training configuration: one dataclass, documented defaults, YAML or TOML files,
``--set key=value`` overrides. The resolved config is saved with every checkpoint.

Every field is checked (``TrainConfig.validate``): a wrong type, a value out of range (NaN
included) or a bad combination is a one-line ``ConfigError`` naming the key. On resume the
checkpoint's config is compared with the given one (``resume_changes``): keys that only steer the
run from there on are applied and listed, keys that fix what the saved state means (model, data
and its order, random draws) are refused, so ``train_config.yaml`` always records what runs.

Defaults follow the original ControlNet repository (its tutorial_train.py and cldm_v15.yaml): AdamW lr 1e-5,
batch 4, fp32, no LR schedule, no EMA; plus the paper's 50% empty prompts, which the original
code never implemented.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..annotators import ALIASES, ANNOTATORS, get_annotator, require
from ..configs import shipped_train_configs


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, bad resume folder); says what to do."""


class ConfigError(ValueError):
    """A bad config value (or a change refused on resume); one line naming the key."""


def _bad(key: str, need: str, value: Any):
    raise ConfigError(f"config: {key} must be {need}, got {value!r}")


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
    # --- the network: controlnet (the seed's full copy) | control_lora (low-rank deltas on the base's
    # encoder, lora_rank) | t2i_adapter (adapter_type: "" = by the base, adapter_res_blocks)
    network: str = "controlnet"
    lora_rank: int = 128
    adapter_type: str = ""
    adapter_res_blocks: int = 2
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
        """Check every field (types, then ranges, then combinations); the first bad one raises a
        one-line ConfigError naming the key. Returns self, with ints given for floats made floats."""
        types = _field_types()
        for f in dataclasses.fields(self):  # a TrainConfig built in Python skips from_dict's coercion
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), types[f.name]))
            if types[f.name] is float and not math.isfinite(getattr(self, f.name)):
                _bad(f.name, "a finite number", getattr(self, f.name))
        if not self.base.strip():
            raise ConfigError("config: 'base' is empty; set it to nano, a diffusers folder or a checkpoint file "
                              "(--set base=PATH)")
        if not self.data.strip():
            raise ConfigError("config: 'data' is empty; set it to a data folder (--set data=DIR)")
        for name in ("output_dir", "image_column", "conditioning_image_column", "caption_column"):
            if not getattr(self, name).strip():
                _bad(name, "a non-empty string", getattr(self, name))
        for name, choices in (("mixed_precision", ("no", "bf16", "fp16")), ("lr_scheduler", ("constant", "cosine")),
                              ("timestep_sampling", ("uniform", "cubic")),
                              ("network", ("controlnet", "control_lora", "t2i_adapter")),
                              ("adapter_type", ("", "full_adapter", "full_adapter_xl", "light_adapter"))):
            if getattr(self, name) not in choices:
                _bad(name, " or ".join(choices), getattr(self, name))
        for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "resolution",
                     "conditioning_channels", "lora_rank", "adapter_res_blocks", "checkpointing_steps",
                     "checkpoints_total_limit", "log_every",
                     "validation_steps", "num_validation_samples", "validation_inference_steps"):
            if getattr(self, name) < 1:
                _bad(name, ">= 1", getattr(self, name))
        for name in ("max_train_samples", "lr_warmup_steps", "timestep_sampling_from", "snr_gamma",
                     "adam_weight_decay", "max_grad_norm", "max_train_minutes", "validation_guidance"):
            if getattr(self, name) < 0:
                _bad(name, ">= 0", getattr(self, name))
        for name in ("learning_rate", "adam_epsilon"):
            if getattr(self, name) <= 0:
                _bad(name, "> 0", getattr(self, name))
        for name in ("ema_decay", "adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                _bad(name, "in [0, 1)", getattr(self, name))
        for name in ("proportion_empty_prompts", "validation_guidance_rescale"):
            if not 0 <= getattr(self, name) <= 1:
                _bad(name, "in [0, 1]", getattr(self, name))
        if not 0 <= self.seed < 2 ** 64:  # torch.manual_seed's range
            _bad("seed", "in [0, 2**64)", self.seed)
        if self.resolution % 8:  # the VAE's factor; the trainer also checks the base's own
            _bad("resolution", "a multiple of 8", self.resolution)
        if not self.hint_channels or not all(type(n) is int and n >= 1 for n in self.hint_channels):
            _bad("hint_channels", "a list of positive integers, e.g. [16, 32, 96, 256]", self.hint_channels)
        if self.annotator:
            if self.annotator not in ANNOTATORS and self.annotator not in ALIASES:
                _bad("annotator", f"empty or one of {', '.join(sorted(ANNOTATORS))}", self.annotator)
            try:
                get_annotator(self.annotator, **self.annotator_params)  # binds the parameters: unknown ones fail
            except (ValueError, TypeError) as e:
                raise ConfigError(f"config: annotator_params: {e}") from None
            try:  # a neural detector's weights (or package): before any work, not in the first batch
                require(self.annotator, self.annotator_params)
            except (ValueError, OSError, ImportError) as e:
                raise ConfigError(f"config: annotator: {e}") from None
        if self.cache and not self.center_crop:
            raise ConfigError("config: random crops (center_crop: false) need cache: false - the cache stores one "
                              "crop per image")
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
            raise ConfigError(f"config: {key} expects true/false, got {value!r}")
        if kind in (list, dict):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                if kind is dict:
                    raise ConfigError(f"config: {key} expects a JSON object, e.g. {key}='{{\"low\": 100}}'") from None
                # a comma list (hint_channels=16,32,96,256): numbers become ints, validate() checks the rest
                value = [int(v) if v.strip().lstrip("-").isdigit() else v.strip() for v in text.split(",") if v.strip()]
        else:
            try:
                return kind(text)
            except ValueError:
                raise ConfigError(f"config: {key} expects {kind.__name__}, got {value!r}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind is list and isinstance(value, tuple):
        value = list(value)
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"config: {key} expects {kind.__name__}, got {value!r} ({type(value).__name__})")
    return value


def from_dict(values: dict[str, Any], source: str = "config") -> TrainConfig:
    types = _field_types()
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(types)}")
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
                raise ConfigError(f"--set expects key=value, got {item!r}")
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


# On resume, the checkpoint's config and the given one (file + --set) may differ. These keys fix
# what the saved state means: the model, the data and the order it is drawn in, the random draws of
# step s. A change would not continue the run but silently start a different one (and break the
# exact-resume guarantee), so it is refused, naming the key and why.
FIXED_ON_RESUME = {
    "base": "the ControlNet was trained against this base",
    "controlnet": "it only sets a new run's starting weights; a resumed run's come from the checkpoint",
    "conditioning_channels": "it is the architecture of the checkpoint's ControlNet",
    "network": "it is the kind of network the checkpoint holds",
    "lora_rank": "it is the architecture of the checkpoint's Control-LoRA",
    "adapter_type": "it is the architecture of the checkpoint's T2I-Adapter",
    "adapter_res_blocks": "it is the architecture of the checkpoint's T2I-Adapter",
    "hint_channels": "it is the architecture of the checkpoint's ControlNet",
    "data": "the samples of step s are positions in a permutation of these records",
    "max_train_samples": "the samples of step s are positions in a permutation of these records",
    "image_column": "it selects the images the run trains on",
    "conditioning_image_column": "it selects the condition the ControlNet is learning",
    "caption_column": "it selects the captions the run trains on",
    "annotator": "it makes the condition the ControlNet is learning",
    "annotator_params": "it makes the condition the ControlNet is learning",
    "resolution": "it sets the training images' geometry, which the latent cache holds",
    "center_crop": "it sets the training images' geometry, which the latent cache holds",
    "random_flip": "it sets the training images' geometry, which the latent cache holds",
    "train_batch_size": "the samples of step s are positions s*batch... of the data order: a change repeats or "
                        "skips samples",
    "gradient_accumulation_steps": "the samples of step s are positions s*batch... of the data order: a change "
                                   "repeats or skips samples",
    "seed": "the data order and every random draw of step s come from (seed, s)",
}
# The rest only steer the run from the checkpoint on, and are applied (and logged): the optimizer's
# hyper-parameters and LR schedule (re-applied over those the optimizer state restores), the
# procedure's later draws, when to stop / checkpoint / log / validate, speed, memory, where to write.
APPLIED_ON_RESUME = frozenset({
    "learning_rate", "lr_warmup_steps", "lr_scheduler", "adam_beta1", "adam_beta2", "adam_weight_decay",
    "adam_epsilon", "max_grad_norm", "ema_decay", "proportion_empty_prompts", "timestep_sampling",
    "timestep_sampling_from", "snr_gamma", "skip_bad", "max_train_steps", "max_train_minutes",
    "checkpointing_steps", "checkpoints_total_limit", "log_every", "validation_data", "validation_steps",
    "num_validation_samples", "validation_inference_steps", "validation_guidance", "validation_guidance_rescale",
    "tensorboard", "mixed_precision", "gradient_checkpointing", "cpu", "cache", "cache_dir", "retain_cpu_memory",
    "output_dir",
})


def _shown(value: Any) -> str:
    """A value as it would be typed after --set key=."""
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def resume_changes(saved: dict[str, Any], config: TrainConfig, step: int) -> list[str]:
    """Compare a checkpoint's config (``saved``, at optimizer step ``step``) with the one given for
    the resumed run: ``"key old -> new"`` for each change that is applied; one ConfigError line
    naming every refused key and why. A key the checkpoint lacks (written before it existed) is
    compared with its default, the value that run used."""
    types = _field_types()
    applied, refused = [], []
    for f in dataclasses.fields(TrainConfig):
        name = f.name
        old = saved.get(name, f.default if f.default is not dataclasses.MISSING else f.default_factory())
        try:
            old = _coerce(name, old, types[name])  # JSON gives lists for tuples, ints for whole floats
        except ConfigError:
            pass
        new = getattr(config, name)
        if old == new:
            continue
        change = f"{name} {_shown(old)} -> {_shown(new)}"
        if name in FIXED_ON_RESUME:
            refused.append(f"{change} ({FIXED_ON_RESUME[name]})")
        elif name == "ema_decay" and not old:
            refused.append(f"{change} (the checkpoint has no EMA weights to continue)")
        elif name == "max_train_steps" and new < step:
            refused.append(f"{change} (the checkpoint is already at step {step})")
        else:
            applied.append(change)
    if refused:
        raise ConfigError(f"resume: cannot change on resume: {'; '.join(refused)}. Resume with the checkpoint's "
                          "values (--set key=old), or train a new run into another output_dir")
    return applied

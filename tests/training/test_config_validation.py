"""Every field of TrainConfig has a check: each bad value is a one-line ConfigError naming the key,
from a file's typed values and from --set strings alike."""

import dataclasses

import pytest

from ctrlnet.training import ConfigError, TrainConfig, load_config

NAN, INF = float("nan"), float("inf")

# key -> bad values (typed, as a YAML/TOML file or a dict gives them)
BAD = {
    "base": ["", "  ", 5],
    "data": ["", None],
    "validation_data": [3],
    "output_dir": ["", 1.5],
    "image_column": ["", []],
    "conditioning_image_column": [""],
    "caption_column": [""],
    "max_train_samples": [-1, 1.5, "ten"],
    "annotator": ["no-such-annotator", 7],
    "annotator_params": [[1], "low=5"],
    "resolution": [0, -64, 100, 63.5],
    "center_crop": ["maybe", 2],
    "random_flip": ["sometimes", None],
    "skip_bad": [1, "perhaps"],
    "network": ["lora", "", 3],
    "lora_rank": [0, -4, 2.5, "high"],
    "adapter_type": ["full", 1],
    "adapter_res_blocks": [0, 1.5],
    "controlnet": [0],
    "conditioning_channels": [0, -3],
    "hint_channels": ["abc", [], [16, 0], [16, -32], [16.5, 32], [True, 8], {"a": 1}],
    "proportion_empty_prompts": [-0.1, 1.5, NAN, "half"],
    "timestep_sampling": ["log", ""],
    "timestep_sampling_from": [-1],
    "snr_gamma": [-1.0, NAN, INF],
    "learning_rate": [0, -1e-5, NAN, INF, "fast", None],
    "lr_warmup_steps": [-1, 2.5],
    "lr_scheduler": ["linear"],
    "ema_decay": [-0.1, 1.0, NAN],
    "adam_beta1": [-0.1, 1.0, NAN],
    "adam_beta2": [1.5, NAN],
    "adam_weight_decay": [-0.01, NAN],
    "adam_epsilon": [0.0, -1e-8, NAN],
    "max_grad_norm": [-1.0, NAN],
    "train_batch_size": [0, -2, "four"],
    "gradient_accumulation_steps": [0],
    "max_train_steps": [0, -5, 1e3 + 0.5],
    "max_train_minutes": [-1.0, NAN, INF],
    "seed": [-1, 2 ** 64, 1.5],
    "mixed_precision": ["fp8", "bf16 "],
    "gradient_checkpointing": ["often"],
    "cpu": ["gpu"],
    "cache": ["maybe"],
    "cache_dir": [False],
    "retain_cpu_memory": [3],
    "checkpointing_steps": [0],
    "checkpoints_total_limit": [0, -1],
    "log_every": [0],
    "validation_steps": [0],
    "num_validation_samples": [0],
    "validation_inference_steps": [0],
    "validation_guidance": [-1.0, NAN],
    "validation_guidance_rescale": [-0.1, 1.5, NAN],
    "tensorboard": ["yes please"],
}


def test_every_field_has_bad_values():
    assert set(BAD) == {f.name for f in dataclasses.fields(TrainConfig)}


@pytest.mark.parametrize("key, value", [(k, v) for k, values in BAD.items() for v in values])
def test_bad_value_names_the_key(key, value):
    with pytest.raises(ConfigError) as e:
        load_config(None, {"data": "x", key: value})
    message = str(e.value)
    assert key in message and "\n" not in message, message
    if not isinstance(value, str) and value is not None:  # a TrainConfig built in Python is checked the same
        with pytest.raises(ConfigError, match=key):
            TrainConfig(**{"data": "x", key: value}).validate()


@pytest.mark.parametrize("item", [
    "learning_rate=abc", "learning_rate=nan", "learning_rate=-1e-5", "train_batch_size=four",
    "train_batch_size=1.5", "max_train_steps=0", "hint_channels=abc", "hint_channels=16,x,32",
    "hint_channels=[16, \"x\"]", "annotator_params=[1]", "annotator_params=low", "cache=maybe", "seed=1.5",
    "checkpoints_total_limit=0", "resolution=100", "proportion_empty_prompts=2", "ema_decay=nan",
])
def test_set_strings_name_the_key(item):
    key = item.split("=")[0]
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data=x", item])
    assert key in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_good_values_still_load():
    c = load_config(None, ["data=x", "hint_channels=16,32,96,256", "learning_rate=2e-5", "seed=7",
                           "annotator=canny", 'annotator_params={"low": 50}', "proportion_empty_prompts=0",
                           "checkpoints_total_limit=1", "validation_guidance=0"])
    assert c.hint_channels == [16, 32, 96, 256] and c.learning_rate == 2e-5 and c.annotator_params == {"low": 50}
    direct = TrainConfig(data="x", learning_rate=1, max_grad_norm=0).validate()
    assert direct.learning_rate == 1.0 and isinstance(direct.learning_rate, float)

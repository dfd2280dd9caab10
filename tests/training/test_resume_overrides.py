"""Config changes on resume (--set or an edited file): applied and logged, or refused in one line
naming the key - never silently ignored while train_config.yaml claims them."""

import dataclasses
import re
import json
from pathlib import Path

import pytest
import yaml

from ctrlnet.training import ConfigError, TrainConfig, train
from ctrlnet.training.config import APPLIED_ON_RESUME, FIXED_ON_RESUME, resume_changes
from ctrlnet.training.trainer import Trainer


def test_every_key_has_a_resume_rule():
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(FIXED_ON_RESUME) | APPLIED_ON_RESUME == names and not set(FIXED_ON_RESUME) & APPLIED_ON_RESUME


def test_resume_changes_compares_with_the_checkpoints_config():
    config = TrainConfig(data="d", learning_rate=2e-5)
    saved = json.loads(json.dumps(TrainConfig(data="d").to_dict()))  # as state.json holds it
    assert resume_changes(saved, config, 10) == ["learning_rate 1e-05 -> 2e-05"]
    del saved["snr_gamma"]  # a checkpoint older than the key: it ran with the default
    assert resume_changes(saved, config, 10) == ["learning_rate 1e-05 -> 2e-05"]
    with pytest.raises(ConfigError, match=r"resolution 512 -> 256 .*geometry.*; seed 0 -> 1 .*\(seed, s\)"):
        resume_changes(saved, TrainConfig(data="d", seed=1, resolution=256), 10)


def first_half(make_config, **overrides):
    """2 steps with a checkpoint at step 2: a run to resume."""
    cfg = make_config(max_train_steps=2, checkpointing_steps=2, **overrides)
    train(cfg, progress=False)
    return cfg


def test_safe_changes_are_applied_and_recorded(make_config, capsys):
    cfg = first_half(make_config)
    ckpts = Path(cfg.output_dir) / "checkpoints"
    state2 = json.loads((ckpts / "step-000002" / "state.json").read_text())
    assert state2["optimizer"]["param_groups"][0]["lr"] == 1e-3
    changed = {"learning_rate": 2e-3, "adam_weight_decay": 0.0, "max_train_steps": 4, "checkpointing_steps": 1,
               "checkpoints_total_limit": 5, "log_every": 2}
    capsys.readouterr()
    train(TrainConfig(**{**cfg.to_dict(), **changed}), resume="latest", progress=False)
    said = capsys.readouterr().out
    for line in ("applied on resume: learning_rate 0.001 -> 0.002", "applied on resume: max_train_steps 2 -> 4",
                 "applied on resume: adam_weight_decay 0.01 -> 0.0", "applied on resume: checkpointing_steps 2 -> 1"):
        assert line in said.splitlines(), said
    # The optimizer runs the new values (its restored state held the old ones), and what is recorded
    # - train_config.yaml, each later checkpoint's config - is what ran.
    state = json.loads((ckpts / "step-000003" / "state.json").read_text())
    group = state["optimizer"]["param_groups"][0]
    assert (group["lr"], group["weight_decay"]) == (2e-3, 0.0)
    recorded = yaml.safe_load((Path(cfg.output_dir) / "train_config.yaml").read_text())
    assert {k: recorded[k] for k in changed} == changed == {k: state["config"][k] for k in changed}
    log = [json.loads(l) for l in (Path(cfg.output_dir) / "log.jsonl").read_text().splitlines() if "loss" in l]
    assert [r["step"] for r in log] == [1, 2, 4] and log[-1]["lr"] == 2e-3  # log_every 2 from step 3 on


@pytest.mark.parametrize("override, reason", [
    ({"resolution": 128}, "geometry"),
    ({"seed": 1}, r"\(seed, s\)"),
    ({"train_batch_size": 4}, "repeats or skips samples"),
    ({"hint_channels": [4, 8, 8, 16]}, "architecture"),
    ({"data": "elsewhere/prompt.json"}, "permutation of these records"),
    ({"ema_decay": 0.9}, "no EMA weights"),
    ({"max_train_steps": 1}, "already at step 2"),
])
def test_unsafe_changes_are_refused(make_config, override, reason):
    cfg = first_half(make_config)
    key = next(iter(override))
    resumed = TrainConfig(**{**cfg.to_dict(), **override})
    with pytest.raises(ConfigError) as e:
        Trainer(resumed, progress=False, resume="latest")
    message = str(e.value)
    assert message.startswith(f"resume: cannot change on resume: {key} ") and "\n" not in message
    assert re.search(reason, message), message
    recorded = yaml.safe_load((Path(cfg.output_dir) / "train_config.yaml").read_text())
    assert recorded[key] == getattr(cfg, key)  # train_config.yaml still says what ran


def test_refusal_through_the_cli_is_one_line(make_config, tmp_path, capsys):
    from ctrlnet.cli import main
    cfg = first_half(make_config)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    capsys.readouterr()
    assert main(["train", "--config", str(path), "--set", "seed=3", "--resume", "latest"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ctrlnet train: error: resume: cannot change on resume: seed 0 -> 3") and "\n" not in err

"""Checkpoints that can be trusted: checksums verified on read (truncation, a flipped byte, a
deleted file each named in one line), --resume latest falling back to the newest good checkpoint
and continuing bit-identically, older checkpoints without checksums still loading (unverified),
and no checkpoint ever written with non-finite weights, EMA or optimizer state."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ctrlnet.formats.checkpoint import (MANIFEST, checkpoint_dirs, latest_checkpoint, newest_good_checkpoint,
                                        read_checkpoint, unflat, verify_checkpoint, write_checkpoint)
from ctrlnet.formats.safe_load import CheckpointError
from ctrlnet.training import TrainingError, train
from ctrlnet.training.trainer import Trainer


def final_weights(out) -> dict:
    return load_file(Path(out) / "controlnet" / "diffusion_pytorch_model.safetensors")


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def flip_middle_byte(path: Path) -> None:
    """One bit of tensor data changed, the header intact: a file safetensors still loads."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")  # u64 header length, then the JSON header, then the data
    middle = start + (len(data) - start) // 2
    data[middle] ^= 0x10
    path.write_bytes(bytes(data))


def strip_checksums(folder: Path) -> None:
    """Make a checkpoint look like one written before checksums existed."""
    (folder / MANIFEST).unlink()
    state = json.loads((folder / "state.json").read_text())
    del state["manifest"]
    (folder / "state.json").write_text(json.dumps(state))


DAMAGE = {
    "truncated": (lambda f: truncate(f / "state.safetensors"), "state.safetensors: checksum mismatch"),
    "flipped byte": (lambda f: flip_middle_byte(f / "state.safetensors"), "state.safetensors: checksum mismatch"),
    "deleted weights": (lambda f: (f / "state.safetensors").unlink(), "state.safetensors: missing"),
    "deleted state": (lambda f: (f / "state.json").unlink(), "state.json: missing"),
    "deleted manifest": (lambda f: (f / MANIFEST).unlink(), "manifest.json: missing"),
    "truncated state": (lambda f: truncate(f / "state.json"), "state.json: checksum mismatch"),
    "edited manifest": (lambda f: (f / MANIFEST).write_text((f / MANIFEST).read_text().replace('"bytes": ',
                                                                                             '"bytes": 1')),
                        "manifest.json: checksum mismatch"),
}


@pytest.fixture
def small_checkpoint(tmp_path):
    tensors = {"controlnet.w": torch.arange(4096, dtype=torch.float32), "optimizer.0.exp_avg": torch.ones(64)}
    return write_checkpoint(tmp_path / "checkpoints", 6, tensors, {"step": 6, "config": {}}), tensors


def test_manifest_is_written_and_verifies(small_checkpoint):
    folder, tensors = small_checkpoint
    assert sorted(p.name for p in folder.iterdir()) == [MANIFEST, "state.json", "state.safetensors"]
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["algorithm"] == "sha256" and sorted(manifest["files"]) == ["state.json", "state.safetensors"]
    assert verify_checkpoint(folder) is True
    loaded, state = read_checkpoint(folder)
    assert state == {"step": 6, "config": {}}  # the manifest marker is not part of the state
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damage_is_named_in_one_line(small_checkpoint, damage):
    folder, _ = small_checkpoint
    harm, words = DAMAGE[damage]
    harm(folder)
    for check in (verify_checkpoint, read_checkpoint):
        with pytest.raises(CheckpointError) as e:
            check(folder)
        message = str(e.value)
        assert words in message and str(folder) in message and "\n" not in message, message
        if "checksum" in words:
            assert "(truncated or corrupted" in message


def test_flipped_byte_would_load_silently_without_the_checksum(small_checkpoint):
    """The case only a checksum catches: a valid file with wrong numbers."""
    folder, tensors = small_checkpoint
    flip_middle_byte(folder / "state.safetensors")
    loaded, _ = read_checkpoint(folder, verify=False)
    assert loaded.keys() == tensors.keys() and not all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_older_checkpoints_load_unverified(small_checkpoint):
    folder, tensors = small_checkpoint
    strip_checksums(folder)
    assert verify_checkpoint(folder) is False
    assert torch.equal(read_checkpoint(folder)[0]["controlnet.w"], tensors["controlnet.w"])
    truncate(folder / "state.safetensors")  # still a one-line error, from safetensors' own checks
    with pytest.raises(CheckpointError, match="state.safetensors: not readable"):
        read_checkpoint(folder)


def test_newest_good_checkpoint_passes_over_damaged_ones(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        write_checkpoint(root, step, {"w": torch.full((8,), float(step))}, {"step": step})
    truncate(root / "step-000006" / "state.safetensors")
    (root / "step-000004" / "state.json").unlink()  # not even listed by checkpoint_dirs any more
    path, verified, bad = newest_good_checkpoint(root)
    assert path.name == "step-000002" and verified
    assert [(p.name, "checksum mismatch" in why or "state.json: missing" in why) for p, why in bad] == \
        [("step-000006", True), ("step-000004", True)]
    assert newest_good_checkpoint(tmp_path / "nothing") == (None, False, [])


def test_rotation_never_removes_the_checkpoint_just_written(tmp_path):
    """A later step's folder (left by a run resumed from an earlier checkpoint) does not count
    towards checkpoints_total_limit: it must not push out the step being written."""
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        write_checkpoint(root, step, {"w": torch.zeros(2)}, {"step": step}, keep=3)
    write_checkpoint(root, 3, {"w": torch.zeros(2)}, {"step": 3}, keep=1)
    assert [s for s, _ in checkpoint_dirs(root)] == [3, 4, 6]


# ---------------------------------------------------------------- the trainer's resume


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, tiny_bases, shapes64):
    """6 steps, checkpoints at 2, 4, 6, EMA and a cosine schedule (their state must survive too)."""
    from ctrlnet.training import load_config
    out = tmp_path_factory.mktemp("straight") / "run"
    values = dict(base=tiny_bases["sd15"], data=str(shapes64 / "train" / "prompt_canny.json"), output_dir=str(out),
                  resolution=64, train_batch_size=2, max_train_steps=6, checkpointing_steps=2, log_every=1,
                  hint_channels=[4, 8, 8, 8], learning_rate=1e-3, validation_steps=1000, tensorboard=False,
                  ema_decay=0.9, lr_scheduler="cosine", lr_warmup_steps=1, cache_dir=str(out.parent / "cache"))
    cfg = load_config(None, values)
    train(cfg, progress=False)
    return cfg, final_weights(out)


def copy_of_run(straight_run, tmp_path):
    """The straight run's output folder as it was before its final folder was written (a run
    killed after its last checkpoint), to damage and resume."""
    cfg, weights = straight_run
    out = tmp_path / "run"
    shutil.copytree(cfg.output_dir, out)
    shutil.rmtree(out / "controlnet")
    return type(cfg)(**{**cfg.to_dict(), "output_dir": str(out)}), weights


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "deleted weights", "deleted state"])
def test_resume_latest_falls_back_to_the_newest_good_checkpoint(straight_run, tmp_path, capsys, damage):
    cfg, expected = copy_of_run(straight_run, tmp_path)
    ckpts = Path(cfg.output_dir) / "checkpoints"
    harm, words = DAMAGE[damage]
    harm(ckpts / "step-000006")
    capsys.readouterr()
    train(cfg, resume="latest", progress=False)
    said = capsys.readouterr().out
    line = next(l for l in said.splitlines() if l.startswith("resume latest:"))
    assert words in line and "step-000006" in line and "resuming from step-000004 instead" in line, said
    assert "resumed from" in said and "at step 4" in said and "unverified" not in said
    # The damaged folder is kept aside, out of the way of rotation and `step-*` globs; step 6 is redone.
    assert not list(ckpts.glob("step-*.*"))
    assert (ckpts / "corrupt-step-000006").is_dir() and verify_checkpoint(ckpts / "step-000006")
    got = final_weights(cfg.output_dir)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    steps = [json.loads(l)["step"] for l in (Path(cfg.output_dir) / "log.jsonl").read_text().splitlines()
             if "loss" in l]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_older_checkpoints_resume_unverified(straight_run, tmp_path, capsys):
    cfg, expected = copy_of_run(straight_run, tmp_path)
    ckpts = Path(cfg.output_dir) / "checkpoints"
    shutil.rmtree(ckpts / "step-000006")
    strip_checksums(ckpts / "step-000004")
    capsys.readouterr()
    train(cfg, resume="latest", progress=False)
    assert "at step 4 (unverified: written before checkpoints had checksums)" in capsys.readouterr().out
    got = final_weights(cfg.output_dir)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_an_explicit_damaged_checkpoint_is_refused(straight_run, tmp_path):
    cfg, _ = copy_of_run(straight_run, tmp_path)
    ckpts = Path(cfg.output_dir) / "checkpoints"
    flip_middle_byte(ckpts / "step-000004" / "state.safetensors")
    with pytest.raises(CheckpointError, match=r"^resume: .*step-000004/state.safetensors: checksum mismatch"):
        Trainer(cfg, progress=False, resume=str(ckpts / "step-000004"))
    for step in (2, 6):
        truncate(ckpts / f"step-{step:06d}" / "state.safetensors")
    with pytest.raises(TrainingError, match="no checkpoint in .* verifies"):  # nothing to fall back to
        train(cfg, resume="latest", progress=False)
    assert (ckpts / "step-000006").is_dir()  # nothing set aside when nothing is resumed


# ---------------------------------------------------------------- finite-only checkpoints


def test_no_checkpoint_with_non_finite_weights(make_config, tmp_path):
    """An update that overflows every weight (lr 1e39 > float32's max) at step 3, given on resume:
    the loss of step 3 is still finite (computed before the update); the checkpoint is refused."""
    cfg = make_config(max_train_steps=2, checkpointing_steps=1)
    train(cfg, progress=False)
    ckpts = Path(cfg.output_dir) / "checkpoints"
    huge = type(cfg)(**{**cfg.to_dict(), "learning_rate": 1e39, "max_train_steps": 4})
    with pytest.raises(TrainingError, match=r"non-finite values at step 3 .*controlnet\..*checkpoint not written. "
                                            r"Last good checkpoint: .*step-000002"):
        train(huge, resume="latest", progress=False)
    assert [s for s, _ in checkpoint_dirs(ckpts)] == [1, 2]
    tensors, _ = read_checkpoint(latest_checkpoint(ckpts))
    assert all(torch.isfinite(v).all() for v in tensors.values())


def test_no_checkpoint_with_a_non_finite_ema(make_config):
    """A NaN in the EMA never reaches the loss, so only the checkpoint's own check can stop it."""
    tr = Trainer(make_config(max_train_steps=4, checkpointing_steps=1, ema_decay=0.9), progress=False)
    update = tr.update_ema

    def update_then_poison():
        update()
        if tr.step == 3:
            with torch.no_grad():
                next(tr.ema.parameters()).view(-1)[0] = float("nan")
    tr.update_ema = update_then_poison
    with pytest.raises(TrainingError, match=r"non-finite values at step 3 in 1 tensor\(s\), e.g. \['ema\."):
        tr.train()
    ckpts = tr.ckpt_root
    assert [s for s, _ in checkpoint_dirs(ckpts)] == [1, 2]
    tensors, _ = read_checkpoint(latest_checkpoint(ckpts))
    assert all(torch.isfinite(v).all() for v in unflat("ema", tensors).values())


def test_a_refused_resume_moves_no_checkpoint(straight_run, tmp_path):
    """A config change refused on resume stops before the damaged newer folder is set aside: a
    refused command leaves the disk as it found it."""
    from ctrlnet.training.config import ConfigError
    cfg, _ = copy_of_run(straight_run, tmp_path)
    ckpts = Path(cfg.output_dir) / "checkpoints"
    DAMAGE["truncated"][0](ckpts / "step-000006")
    before = sorted(p.name for p in ckpts.iterdir())
    with pytest.raises(ConfigError, match="cannot change on resume: seed"):
        Trainer(type(cfg)(**{**cfg.to_dict(), "seed": cfg.seed + 1}), progress=False, resume="latest")
    assert sorted(p.name for p in ckpts.iterdir()) == before and "step-000006" in before

"""The training procedure on tiny real models: locked base, encoder-copy init, empty prompts, the
base's own objective, checkpoints and exact resume, multi-process equality, bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ctrlnet.formats import inspect_checkpoint, load_controlnet
from ctrlnet.training import TrainingError, train
from ctrlnet.formats.checkpoint import latest_checkpoint, unflat
from ctrlnet.training.data import DataError
from ctrlnet.training.trainer import Trainer, lr_factor

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def final_weights(out) -> dict:
    return load_file(Path(out) / "controlnet" / "diffusion_pytorch_model.safetensors")


def test_procedure_locked_base_and_encoder_copy(make_config, tmp_path):
    tr = Trainer(make_config(max_train_steps=3), progress=False)
    base_before = {k: v.clone() for k, v in tr.base.unet.state_dict().items()}
    for part in tr.base.parts().values():
        assert not any(p.requires_grad for p in part.parameters()) and not part.training
    # The ControlNet starts as a copy of the base encoder, its zero convs at zero.
    net = tr.net_raw.state_dict()
    shared = [k for k in net if k.startswith(("conv_in", "time_embedding", "down_blocks", "mid_block"))]
    assert shared and all(torch.equal(net[k], base_before[k]) for k in shared)
    zero = [k for k in net if k.startswith(("controlnet_down_blocks", "controlnet_mid_block"))]
    assert zero and all(not net[k].any() for k in zero)
    out = tr.train()
    assert all(torch.equal(v, base_before[k]) for k, v in tr.base.unet.state_dict().items())  # base untouched
    trained = final_weights(tr.out)
    assert any(trained[k].any() for k in zero)  # the zero convs learned
    # The output folder loads in diffusers and in ctrlnet, with the same tensors.
    from diffusers import ControlNetModel
    theirs = ControlNetModel.from_pretrained(out).state_dict()
    ours = load_controlnet(out).state_dict()
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)
    log = [json.loads(l) for l in (tr.out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in log if "loss" in r)
    assert (tr.out / "train_config.yaml").is_file() and (tr.out / "curves.png").is_file()


@pytest.mark.parametrize("family, prediction", [("sd15", "epsilon"), ("sd21", "v_prediction"), ("sdxl", "epsilon")])
def test_objective_is_the_bases(make_config, family, prediction):
    """At step 0 (zero convs) the loss is exactly the base's own loss, written out here by hand."""
    tr = Trainer(make_config(family, proportion_empty_prompts=0.0), progress=False)
    assert tr.prediction_type == prediction
    tr.net = tr.net_raw
    batch = tr.batch(0)
    x0, noise, t = batch["latents"], batch["noise"], batch["timesteps"]
    acp = tr.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = acp.sqrt() * x0 + (1 - acp).sqrt() * noise
    target = noise if prediction == "epsilon" else acp.sqrt() * noise - (1 - acp).sqrt() * x0
    with torch.no_grad():
        pred = tr.base.unet(noisy, t, batch["hidden"], added_cond_kwargs=batch.get("added")).sample
        expected = torch.nn.functional.mse_loss(pred, target)
        assert torch.allclose(tr.loss(batch), expected, rtol=1e-5, atol=1e-6)
    assert tr.train().is_dir()  # a few real steps of this family run


def test_empty_prompt_proportion(make_config):
    def hidden_rows(p):
        tr = Trainer(make_config(proportion_empty_prompts=p, train_batch_size=8), progress=False)
        empty = torch.from_numpy(np.array(tr.cache.hidden[0])).float()
        rows = torch.cat([tr.batch(m)["hidden"] for m in range(4)])
        return [bool(torch.equal(r, empty)) for r in rows]
    assert all(hidden_rows(1.0))
    assert not any(hidden_rows(0.0))
    half = hidden_rows(0.5)
    assert 8 <= sum(half) <= 24  # 32 draws at p = 0.5


def test_validation_monitor_writes_scores_grid_and_curves(make_config, shapes64):
    cfg = make_config(max_train_steps=2, validation_steps=2, num_validation_samples=2, validation_inference_steps=2,
                      validation_data=str(shapes64 / "val" / "prompt_canny.json"))
    out = Path(train(cfg, progress=False)).parent
    val = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines() if "iou" in l]
    assert [r["step"] for r in val] == [0, 2] and all(0 <= r["iou"] <= 1 and 0 <= r["edge_f1"] <= 1 for r in val)
    grid = np.asarray(Image.open(out / "validation" / "step-000002.png"))
    assert grid.shape == (2 * 64, 3 * 64, 3)
    assert (out / "curves.png").stat().st_size > 1000


def test_annotator_on_the_fly(make_config, shapes64):
    """No condition files: canny runs on the (cropped) target, giving ShapesWorld's own canny maps."""
    cfg = make_config(data=str(shapes64 / "train" / "metadata.jsonl"), annotator="canny", max_train_steps=1)
    tr = Trainer(cfg, progress=False)
    for i in (0, 5):
        expected = np.asarray(Image.open(shapes64 / "train" / "canny" / f"{i}.png").convert("RGB"))
        assert np.array_equal(tr.dataset.condition(i), expected)
    tr.train()


def test_cache_is_reused_and_invalidated(make_config, shapes64, tmp_path):
    from ctrlnet.training.cache import fingerprint
    tr = Trainer(make_config(max_train_steps=1), progress=False)
    folder = tr.cache.folder
    stamp = (folder / "fingerprint.json").stat().st_mtime_ns
    again = Trainer(make_config(max_train_steps=1), progress=False)
    assert again.cache.folder == folder and (folder / "fingerprint.json").stat().st_mtime_ns == stamp
    shared = tmp_path / "shared-cache"
    one = Trainer(make_config(max_train_steps=1, cache_dir=str(shared), output_dir=str(tmp_path / "o1")), progress=False)
    two = Trainer(make_config(max_train_steps=1, cache_dir=str(shared), output_dir=str(tmp_path / "o2"),
                              data=str(shapes64 / "train" / "prompt_segmentation.json")), progress=False)
    assert one.cache.folder == two.cache.folder == shared / folder.name  # conditions are not in the cache
    key = fingerprint(tr.base, tr.dataset.records, 64, True, False)
    assert key == folder.name
    assert fingerprint(tr.base, tr.dataset.records, 64, True, True) != key  # flip
    assert fingerprint(tr.base, tr.dataset.records, 128, True, False) != key  # resolution
    assert fingerprint(tr.base, tr.dataset.records[:-1], 64, True, False) != key  # data
    with torch.no_grad():
        tr.base.vae.decoder.conv_out.bias.add_(1)  # VAE weights
    assert fingerprint(tr.base, tr.dataset.records, 64, True, False) != key
    # Cached posteriors are the VAE's (float16 storage).
    from ctrlnet.training.data import image_to_tensor
    with torch.no_grad():
        params = again.base.vae.encode(image_to_tensor([again.dataset.image(3)])).latent_dist.parameters
    assert torch.allclose(torch.from_numpy(np.array(again.cache.posterior[3, 0])).float(), params[0], atol=1e-2)


def test_bad_image_stops_or_is_skipped(make_config, shapes64, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(shapes64 / "train", data)
    (data / "target" / "4.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match="4.png.*skip_bad"):
        Trainer(make_config(data=str(data / "metadata.jsonl"), output_dir=str(tmp_path / "a")), progress=False)
    tr = Trainer(make_config(data=str(data / "metadata.jsonl"), output_dir=str(tmp_path / "b"), skip_bad=True,
                             max_train_steps=2), progress=False)
    assert tr.skipped == 1 and 4 not in set(tr.valid.tolist()) and len(tr.valid) == 15
    tr.train()
    log = [json.loads(l) for l in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["skipped_bad"] == 1


def test_non_finite_loss_stops_with_last_good_checkpoint(make_config):
    cfg = make_config(learning_rate=1e30, max_grad_norm=0.0, adam_weight_decay=0.0, checkpointing_steps=1,
                      max_train_steps=20)
    with pytest.raises(TrainingError, match=r"loss is (nan|inf).*Last good checkpoint: .*step-0000\d\d"):
        train(cfg, progress=False)
    last = latest_checkpoint(Path(cfg.output_dir) / "checkpoints")
    tensors = load_file(last / "state.safetensors")
    assert all(torch.isfinite(v).all() for v in unflat("controlnet", tensors).values())


def _cli(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "ctrlnet.cli", "train", *args], env=ENV, **kw)


def _write_yaml(path, cfg, **overrides):
    import yaml
    values = {**cfg.to_dict(), **overrides}
    path.write_text(yaml.safe_dump(values))
    return path


# The CLI in a process that SIGKILLs itself while writing its second checkpoint: after the tensors,
# before the state.json that completes it. A real kill mid-run, at the same point on any machine.
KILLED_IN_SECOND_CHECKPOINT = """
import os, signal, sys
from ctrlnet.cli import main
from ctrlnet.formats import checkpoint
write, calls = checkpoint.write_safetensors, []
def write_then_die(*args, **kwargs):
    write(*args, **kwargs)
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint.write_safetensors = write_then_die
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_then_resume_is_bit_identical(make_config, tmp_path):
    # EMA and the cosine schedule on: their state must survive the kill too.
    cfg = make_config(max_train_steps=12, checkpointing_steps=3, ema_decay=0.9, lr_scheduler="cosine",
                      lr_warmup_steps=2)
    straight = _write_yaml(tmp_path / "straight.yaml", cfg, output_dir=str(tmp_path / "straight"))
    killed = _write_yaml(tmp_path / "killed.yaml", cfg, output_dir=str(tmp_path / "killed"))
    assert _cli(["--config", str(straight)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).wait() == 0
    proc = subprocess.Popen([sys.executable, "-c", KILLED_IN_SECOND_CHECKPOINT, "train", "--config", str(killed)],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert proc.wait(timeout=600) == -signal.SIGKILL, "the run was not killed in its second checkpoint"
    assert not (tmp_path / "killed" / "controlnet").exists()
    ckpts = tmp_path / "killed" / "checkpoints"
    half = ckpts / ".tmp-step-000006"  # step 6's tensors without its state.json: not a checkpoint
    assert (half / "state.safetensors").is_file() and not (half / "state.json").exists()
    assert latest_checkpoint(ckpts).name == "step-000003"
    assert _cli(["--config", str(killed), "--resume", "latest"], stdout=subprocess.DEVNULL).wait() == 0
    assert not half.exists()
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The log was trimmed to the checkpoint and continued: every step once.
    steps = [json.loads(l)["step"] for l in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()
             if "loss" in l]
    assert steps == list(range(1, 13))


def test_two_processes_equal_one_with_the_same_global_batch(make_config, tmp_path):
    cfg = make_config(max_train_steps=3, train_batch_size=2, proportion_empty_prompts=0.5)
    two = _write_yaml(tmp_path / "two.yaml", cfg, output_dir=str(tmp_path / "two"))
    one = _write_yaml(tmp_path / "one.yaml", cfg, output_dir=str(tmp_path / "one"), train_batch_size=4)
    import socket
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                "-m", "ctrlnet.cli", "train", "--config", str(two)]
    res = subprocess.run(torchrun, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _cli(["--config", str(one)], stdout=subprocess.DEVNULL).wait() == 0
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    moved = sum(float((a[k] - b[k]).abs().max()) for k in a)
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a), moved
    digests = json.loads((tmp_path / "two" / "controlnet" / "training.json").read_text())["weights_digest_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]  # both ranks ended with identical weights
    log = [json.loads(l) for l in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert log[0]["processes"] == 2 and log[0]["global_batch"] == 4
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3]


def test_cli_train_and_its_errors(make_config, tmp_path, capsys):
    from ctrlnet.cli import main
    cfg = _write_yaml(tmp_path / "c.yaml", make_config(), output_dir=str(tmp_path / "cli"))
    assert main(["train", "--config", str(cfg), "--set", "max_train_steps=1"]) == 0
    assert (tmp_path / "cli" / "controlnet" / "config.json").is_file()
    assert main(["train", "--config", str(cfg), "--set", "lerning_rate=1"]) == 2
    assert "lerning_rate" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml" in capsys.readouterr().err


def test_timestep_sampling_and_sample_limit(make_config):
    uniform = Trainer(make_config(max_train_samples=10), progress=False)
    assert len(uniform.valid) == 10 and max(uniform.indices(7)) < 10
    cubic = Trainer(make_config(timestep_sampling="cubic", train_batch_size=64), progress=False)
    t_u = torch.cat([uniform.batch(m)["timesteps"] for m in range(32)]).float()
    t_c = torch.cat([cubic.batch(m)["timesteps"] for m in range(4)]).float()
    assert 400 < t_u.mean() < 600 and t_c.mean() > 700  # E[1 - u^3] = 0.75
    assert 0 <= t_c.min() and t_c.max() <= 999
    # cubic from optimizer step 2 on (micro-batches 4, 5 with 2 accumulation steps), uniform before
    later = Trainer(make_config(timestep_sampling="cubic", timestep_sampling_from=2, train_batch_size=64,
                                gradient_accumulation_steps=2), progress=False)
    plain = Trainer(make_config(train_batch_size=64, gradient_accumulation_steps=2), progress=False)
    assert torch.equal(later.batch(3)["timesteps"], plain.batch(3)["timesteps"])
    assert not torch.equal(later.batch(4)["timesteps"], plain.batch(4)["timesteps"])
    assert torch.cat([later.batch(m)["timesteps"] for m in (4, 5)]).float().mean() > 700


def test_min_snr_weighting(make_config):
    t = torch.tensor([0, 100, 500, 999])
    eps = Trainer(make_config(snr_gamma=5.0), progress=False)  # tiny sd15: epsilon
    v = Trainer(make_config("sd21", snr_gamma=5.0), progress=False)  # tiny sd21: v-prediction
    for tr, denominator in ((eps, lambda snr: snr), (v, lambda snr: snr + 1)):
        alpha_bar = tr.noise_scheduler.alphas_cumprod[t].double()
        snr = alpha_bar / (1 - alpha_bar)
        assert torch.allclose(tr.snr_weights(t), (snr.clamp(max=5.0) / denominator(snr)).float())
    w = eps.snr_weights(t)
    # pinned: SD1.5's schedule has alpha_bar_0 = 1 - 0.00085, SNR 1175.5 -> 5 / 1175.5
    assert abs(w[0].item() - 5 / (0.99915 / 0.00085)) < 1e-6 and w[-1] == 1.0  # high noise kept
    # zero terminal SNR (the nano base's schedule): t = 999 has SNR 0
    from diffusers import DDPMScheduler
    own = {tr: (tr.noise_scheduler, tr.prediction_type) for tr in (eps, v)}
    zero = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         rescale_betas_zero_snr=True)
    for tr, prediction, last in ((eps, "epsilon", 1.0), (v, "v_prediction", 0.0), (eps, "sample", 0.0)):
        tr.noise_scheduler, tr.prediction_type = zero, prediction
        assert tr.snr_weights(torch.tensor([999])).item() == last  # epsilon keeps it; v / x0 weight SNR -> 0
    eps.noise_scheduler = plain_scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                          beta_end=0.012)
    eps.prediction_type = "sample"  # x0 target: min(SNR, gamma) itself
    assert torch.allclose(eps.snr_weights(torch.tensor([0, 999])),
                          torch.tensor([5.0, plain_scheduler.alphas_cumprod[999].item()
                                        / (1 - plain_scheduler.alphas_cumprod[999].item())]))
    for tr, (scheduler, prediction) in own.items():  # back to the bases' own
        tr.noise_scheduler, tr.prediction_type = scheduler, prediction
    # a gamma above every SNR changes no weight (epsilon): the plain MSE
    plain, huge = Trainer(make_config(), progress=False), Trainer(make_config(snr_gamma=1e12), progress=False)
    for tr in (plain, huge, eps):
        tr.net = tr.net_raw  # what train() sets after accelerate's prepare
    batch = dict(plain.batch(0), timesteps=torch.tensor([10, 900]))  # one low-noise (SNR > 5), one high-noise step
    with torch.no_grad():
        assert torch.allclose(plain.loss(batch), huge.loss(batch), rtol=1e-5)
        assert not torch.allclose(plain.loss(batch), eps.loss(batch), rtol=1e-3)


def test_wall_time_budget_stops_with_a_checkpoint(make_config):
    cfg = make_config(max_train_steps=10**6, max_train_minutes=0.05, checkpointing_steps=10**5)
    out = train(cfg, progress=False)
    steps = json.loads((out / "training.json").read_text())["steps"]
    assert 0 < steps < 10**6
    last = latest_checkpoint(Path(cfg.output_dir) / "checkpoints")
    assert last.name == f"step-{steps:06d}"
    info = inspect_checkpoint(last)  # what `ctrlnet inspect` says of a training checkpoint folder
    assert info["format"] == "ctrlnet-train-checkpoint"
    assert info["parameters"] == sum(p.numel() for p in load_controlnet(last).parameters())


def test_lr_schedules(make_config):
    constant = lr_factor(make_config(lr_warmup_steps=2, max_train_steps=6))
    cosine = lr_factor(make_config(lr_warmup_steps=2, max_train_steps=6, lr_scheduler="cosine"))
    assert [constant(s) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    # after warmup: cos over the 4 remaining steps, 0 at max_train_steps and after
    assert [round(cosine(s), 6) for s in range(8)] == [0.5, 1.0, 1.0, 0.853553, 0.5, 0.146447, 0.0, 0.0]


def test_ema_weights_are_validated_and_saved(make_config):
    tr = Trainer(make_config(ema_decay=0.5, max_train_steps=3), progress=False)
    live, ema = tr.net_raw, tr.ema
    assert ema is not None and all(torch.equal(a, b) for a, b in zip(live.parameters(), ema.parameters()))
    # The update is ema <- d * ema + (1 - d) * live with d = min(decay, (1 + step) / (10 + step)).
    with torch.no_grad():
        for p in ema.parameters():
            p.zero_()
    tr.step = 90  # d = min(0.5, 91 / 100) = 0.5
    tr.update_ema()
    assert all(torch.allclose(e, 0.5 * p) for e, p in zip(ema.parameters(), live.parameters()))
    tr.step = 0  # d = min(0.5, 1 / 10) = 0.1: an EMA that starts mostly from the live weights
    tr.update_ema()
    assert all(torch.allclose(e, 0.9 * p + 0.1 * 0.5 * p, atol=1e-6) for e, p in zip(ema.parameters(), live.parameters()))
    out = tr.train()  # trains on from step 0 and writes the EMA weights, not the live ones
    saved = final_weights(Path(out).parent)
    assert all(torch.equal(saved[k], v) for k, v in tr.ema.state_dict().items())
    assert any(not torch.equal(saved[k], v) for k, v in tr.net_raw.state_dict().items())
    assert json.loads((Path(out) / "training.json").read_text())["ema"] is True


def test_hugging_face_dataset_saved_to_disk(make_config, shapes64, tmp_path):
    """HF `datasets` columns image / conditioning_image / text, written by save_to_disk, train like the
    folder formats and give the same pixels and captions."""
    datasets = pytest.importorskip("datasets")
    meta = [json.loads(l) for l in (shapes64 / "train" / "metadata.jsonl").read_text().splitlines()]
    root = shapes64 / "train"
    ds = datasets.Dataset.from_dict(
        {"image": [str(root / m["file_name"]) for m in meta],
         "conditioning_image": [str(root / m["conditioning_image"]) for m in meta],
         "text": [m["text"] for m in meta]},
        features=datasets.Features({"image": datasets.Image(), "conditioning_image": datasets.Image(),
                                    "text": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "hf"))
    tr = Trainer(make_config(data=str(tmp_path / "hf"), max_train_steps=1), progress=False)
    folder = Trainer(make_config(data=str(root / "metadata.jsonl"), max_train_steps=1,
                                 output_dir=str(tmp_path / "folder")), progress=False)
    assert len(tr.dataset) == 16
    for i in (0, 7):
        assert tr.dataset.text(i) == folder.dataset.text(i)
        assert np.array_equal(tr.dataset.image(i), folder.dataset.image(i))
        assert np.array_equal(tr.dataset.condition(i), folder.dataset.condition(i))
    tr.train()
    with pytest.raises(DataError, match="no column 'caption'"):
        Trainer(make_config(data=str(tmp_path / "hf"), caption_column="caption"), progress=False)

"""`network: control_lora | t2i_adapter`: the same procedure, checkpoints and exact resume as a ControlNet,
saved in the layout ComfyUI / diffusers load."""

import json

import pytest
import torch
from diffusers import T2IAdapter
from safetensors.torch import load_file

from ctrlnet.base import load_base
from ctrlnet.formats import load_control
from ctrlnet.formats.checkpoint import latest_checkpoint, read_checkpoint
from ctrlnet.models.control_lora import ControlLoRA
from ctrlnet.training.config import ConfigError
from ctrlnet.training.networks import trainable_state
from ctrlnet.training.trainer import Trainer


def weights(tr):
    return {k: v.clone() for k, v in trainable_state(tr.output_net()).items()}


def test_control_lora_trains_on_the_shared_base_and_resumes_exactly(make_config, tiny_bases, tmp_path):
    cfg = make_config(network="control_lora", lora_rank=2, output_dir=str(tmp_path / "a"), ema_decay=0.9)
    tr = Trainer(cfg, progress=False)
    net = tr.net_raw
    assert isinstance(net, ControlLoRA) and net.tied
    base_params = {id(p) for p in tr.base.unet.parameters()}
    tied = dict(net.named_parameters())
    assert all(id(tied[n]) in base_params and not tied[n].requires_grad for n in net.tied)  # shared, frozen
    assert all(id(p) not in base_params for p in tr.optimizer.param_groups[0]["params"])
    assert all(id(dict(tr.ema.named_parameters())[n]) in base_params for n in net.tied)  # the EMA shares them too
    # step 0: up = 0 and zero convolutions: the loss is the base's own
    tr.net = tr.net_raw
    batch = tr.batch(0)
    with torch.no_grad():
        noisy = tr.noise_scheduler.add_noise(batch["latents"], batch["noise"], batch["timesteps"])
        plain = tr.base.unet(noisy, batch["timesteps"], batch["hidden"]).sample
        assert torch.allclose(tr.loss(batch), torch.nn.functional.mse_loss(plain, batch["noise"]), rtol=1e-5)
    base_before = {k: v.clone() for k, v in tr.base.unet.state_dict().items()}
    out = tr.train()
    assert all(torch.equal(v, base_before[k]) for k, v in tr.base.unet.state_dict().items())  # base untouched
    full = weights(tr)
    assert out.name == "control-lora.safetensors" and "lora_controlnet" in load_file(str(out))
    tensors, state = read_checkpoint(latest_checkpoint(tmp_path / "a" / "checkpoints"))
    assert state["network"] == "control_lora" and not any(k.endswith("conv1.weight") for k in tensors)
    loaded = load_control(out, unet=load_base(tiny_bases["sd15"]).unet)
    assert isinstance(loaded, ControlLoRA) and loaded.rank == 2
    # an interrupted run resumed from its step-2 checkpoint ends with the same weights
    part = Trainer(make_config(network="control_lora", lora_rank=2, output_dir=str(tmp_path / "b"), ema_decay=0.9,
                               max_train_steps=2), progress=False)
    part.train()
    again = Trainer(make_config(network="control_lora", lora_rank=2, output_dir=str(tmp_path / "b"), ema_decay=0.9),
                    progress=False, resume="latest")
    again.train()
    resumed = weights(again)
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)


@pytest.mark.parametrize("family, adapter_type", [("sd15", "full_adapter"), ("sdxl", "full_adapter_xl")])
def test_t2i_adapter_trains_saves_for_diffusers_and_resumes_exactly(make_config, tmp_path, family, adapter_type):
    cfg = dict(network="t2i_adapter", adapter_res_blocks=1)
    tr = Trainer(make_config(family, output_dir=str(tmp_path / "a"), **cfg), progress=False)
    assert isinstance(tr.net_raw, T2IAdapter) and tr.net_raw.config.adapter_type == adapter_type
    before = weights(tr)
    out = tr.train()
    full = weights(tr)
    assert any(not torch.equal(before[k], full[k]) for k in full)  # it learned
    assert out.name == "t2i-adapter" and json.loads((out / "config.json").read_text())["_class_name"] == "T2IAdapter"
    theirs = T2IAdapter.from_pretrained(out)
    assert all(torch.equal(theirs.state_dict()[k], v) for k, v in full.items())
    assert (out / "training.json").is_file()
    Trainer(make_config(family, output_dir=str(tmp_path / "b"), max_train_steps=2, **cfg), progress=False).train()
    again = Trainer(make_config(family, output_dir=str(tmp_path / "b"), **cfg), progress=False, resume="latest")
    again.train()
    resumed = weights(again)
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_network_choices_are_checked_and_fixed_on_resume(make_config, tmp_path):
    with pytest.raises(ConfigError, match="network"):
        make_config(network="lora").validate()
    with pytest.raises(ConfigError, match="lora_rank"):
        make_config(network="control_lora", lora_rank=0).validate()
    Trainer(make_config(network="t2i_adapter", adapter_res_blocks=1, max_train_steps=2), progress=False).train()
    with pytest.raises(ConfigError, match="network t2i_adapter -> controlnet"):
        Trainer(make_config(max_train_steps=4), progress=False, resume="latest")


def test_validation_monitor_scores_an_adapter(make_config, shapes64):
    cfg = make_config(network="t2i_adapter", adapter_res_blocks=1, max_train_steps=1,
                      validation_data=str(shapes64 / "val" / "prompt_canny.json"), validation_steps=1,
                      num_validation_samples=2, validation_inference_steps=2)
    tr = Trainer(cfg, progress=False)
    tr.train()
    log = [json.loads(line) for line in (tr.out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "iou" in r] == [0, 1]


def test_checkpoints_of_other_networks_load_and_inspect(make_config, tiny_bases, tmp_path):
    """A training checkpoint of a Control-LoRA or T2I-Adapter loads as its kind (eval's checkpoint globs)."""
    from ctrlnet.formats import inspect_control, kind_of
    from ctrlnet.formats.checkpoint import latest_checkpoint
    for network in ("control_lora", "t2i_adapter"):
        out = tmp_path / network
        tr = Trainer(make_config(network=network, lora_rank=2, adapter_res_blocks=1, output_dir=str(out),
                                 max_train_steps=2), progress=False)
        tr.train()
        ckpt = latest_checkpoint(out / "checkpoints")
        assert kind_of(ckpt) == network and inspect_control(ckpt)["kind"] == network
        net = load_control(ckpt, unet=load_base(tiny_bases["sd15"]).unet)
        final = trainable_state(tr.output_net())
        assert all(torch.equal(trainable_state(net)[k], v) for k, v in final.items())


def test_control_lora_in_mixed_precision_validates_and_leaves_the_base_alone(make_config, shapes64):
    """bf16 base, fp32 Control-LoRA tensors: training, the validation monitor (generation) and the base."""
    from accelerate.state import AcceleratorState
    cfg = make_config(network="control_lora", lora_rank=2, mixed_precision="bf16", max_train_steps=1,
                      validation_data=str(shapes64 / "val" / "prompt_canny.json"), validation_steps=1,
                      num_validation_samples=2, validation_inference_steps=2)
    AcceleratorState._reset_state(reset_partial_state=True)  # accelerate keeps one precision per process
    tr = Trainer(cfg, progress=False)
    assert tr.net_raw.dtype == torch.float32 and tr.base.unet.dtype == torch.bfloat16
    before = {k: v.clone() for k, v in tr.base.unet.state_dict().items()}
    try:
        tr.train()
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert all(v.dtype == torch.bfloat16 and torch.equal(v, before[k]) for k, v in tr.base.unet.state_dict().items())
    log = [json.loads(line) for line in (tr.out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "iou" in r] == [0, 1]


def test_adapter_signal_through_distributed_data_parallel(make_config):
    """Under several processes the trainer calls the network through DDP: the kind is the raw module's."""
    import socket
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from ctrlnet.training.networks import control_signal
    tr = Trainer(make_config(network="t2i_adapter", adapter_res_blocks=1), progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=1, rank=0)
    try:
        ddp = DistributedDataParallel(tr.net_raw)
        batch = tr.batch(0)
        residuals, features = control_signal(tr.net_raw, ddp, batch["latents"], batch["timesteps"], batch["hidden"],
                                             batch["condition"], None)
        assert residuals is None and len(features) == len(tr.net_raw.config.channels)
        assert all(torch.equal(a, b) for a, b in zip(features, tr.net_raw(batch["condition"])))
    finally:
        dist.destroy_process_group()

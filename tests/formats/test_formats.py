"""ControlNet checkpoint formats: round trips, interop with diffusers, detection, strict and safe loading."""

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from ctrlnet.configs import known_controlnet_config
from ctrlnet.formats import (CheckpointError, build_keymap, detect_format, infer_config, inspect_checkpoint,
                             load_controlnet, save_controlnet)
from ctrlnet.models import ControlNet
from conftest import HINT_CHANNELS, make_inputs, randomize


def residuals(net, unet, dtype=torch.float32):
    sample, t, text, cond, kw = make_inputs(unet)
    with torch.no_grad():
        down, mid = net.to(dtype)(sample.to(dtype), t, text.to(dtype), cond, **{
            k: {n: x.to(dtype) for n, x in v.items()} for k, v in kw.items()})
    return [d.float() for d in down] + [mid.float()]


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.fixture
def trained(controlnet):
    return randomize(controlnet)


def test_diffusers_round_trip_and_diffusers_loads_our_export(tmp_path, unet, trained):
    from diffusers import ControlNetModel
    save_controlnet(trained, tmp_path / "cn")
    ref, info = ControlNetModel.from_pretrained(tmp_path / "cn", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    sample, t, text, cond, kw = make_inputs(unet)
    with torch.no_grad():
        ref_out = ref(sample, t, text, cond, return_dict=False, **kw)
    assert max_diff(residuals(trained, unet), list(ref_out[0]) + [ref_out[1]]) <= 1e-5
    again = load_controlnet(tmp_path / "cn")
    assert again.config == trained.config
    assert max_diff(residuals(again, unet), residuals(trained, unet)) == 0


def test_we_load_a_diffusers_saved_controlnet(tmp_path, unet, trained):
    from diffusers import ControlNetModel
    ref = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=HINT_CHANNELS)
    ref.load_state_dict(trained.state_dict())
    ref.save_pretrained(tmp_path / "ref")
    ours = load_controlnet(tmp_path / "ref")
    assert max_diff(residuals(ours, unet), residuals(trained, unet)) <= 1e-6


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_original_round_trip(tmp_path, unet, trained, suffix):
    path = save_controlnet(trained, tmp_path / f"control{suffix}", format="original")
    from safetensors.torch import load_file
    assert detect_format(torch.load(path, weights_only=True) if suffix == ".pth" else load_file(path)) == "original"
    # .pth files carry no metadata: tiny nets off the SD conventions (32 groups) need their config.
    again = load_controlnet(path, config=trained.config if suffix == ".pth" else None)
    assert max_diff(residuals(again, unet), residuals(trained, unet)) == 0
    if suffix == ".pth":
        with pytest.raises(CheckpointError, match="pass its config"):
            load_controlnet(path)


def test_original_keys_agree_with_diffusers_own_converter(tmp_path, unet, trained):
    """Our original names, converted back by diffusers' independent converter, give our tensors."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
    from safetensors.torch import load_file
    path = save_controlnet(trained, tmp_path / "c.safetensors", format="original")
    original = {k[len("control_model."):]: v for k, v in load_file(path).items()}
    c = trained.config
    converted = convert_controlnet_checkpoint(original, {"layers_per_block": c.layers_per_block,
                                                         "down_block_types": c.down_block_types})
    ours = trained.state_dict()
    # diffusers' ControlNet converter does not map SDXL's label_emb (REFERENCE.md section 2); we do.
    expected = {k for k in ours if not k.startswith("add_embedding.")}
    assert set(converted) == expected
    assert all(torch.equal(converted[k].reshape(ours[k].shape), ours[k]) for k in expected)


def test_sd15_original_names_and_shapes():
    """The exact names of a real control_v11p_sd15_*.pth (spot checks) and its size."""
    with torch.device("meta"):
        net = ControlNet(known_controlnet_config("sd15"))
    sd = net.state_dict()
    original = {v: sd[k].shape for k, v in build_keymap(sd, 2, 6).items()}
    assert len(original) == 340 and sum(s.numel() for s in original.values()) == 361_279_120
    expected = {
        "time_embed.0.weight": (1280, 320), "input_blocks.0.0.weight": (320, 4, 3, 3),
        "input_blocks.1.0.in_layers.2.weight": (320, 320, 3, 3), "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "input_blocks.3.0.op.weight": (320, 320, 3, 3), "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "input_blocks.8.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
        "input_blocks.11.0.out_layers.3.weight": (1280, 1280, 3, 3), "middle_block.1.proj_out.weight": (1280, 1280, 1, 1),
        "middle_block.2.emb_layers.1.weight": (1280, 1280), "input_hint_block.0.weight": (16, 3, 3, 3),
        "input_hint_block.14.weight": (320, 256, 3, 3), "zero_convs.0.0.weight": (320, 320, 1, 1),
        "zero_convs.11.0.weight": (1280, 1280, 1, 1), "middle_block_out.0.bias": (1280,),
    }
    for key, shape in expected.items():
        assert tuple(original[key]) == shape, key


def test_config_is_inferred_from_shapes_without_metadata(tmp_path):
    """A foreign original file (no ctrlnet metadata, no prefix) of SD-convention architecture."""
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=8, sample_size=8)
    net = randomize(ControlNet.from_unet(unet))
    keymap = build_keymap(net.state_dict(), 1, 6)
    save_file({keymap[k]: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "c.safetensors")
    inferred = infer_config({keymap[k]: v for k, v in net.state_dict().items()})
    assert inferred == net.config
    again = load_controlnet(tmp_path / "c.safetensors")
    assert max_diff(residuals(again, unet), residuals(net, unet)) == 0
    assert inspect_checkpoint(tmp_path / "c.safetensors")["base"] == "custom"


def test_v10_full_model_file_nested_under_state_dict(tmp_path, unet, trained):
    """A v1.0 control_sd15_*.pth: whole SD + ControlNet, as a Lightning checkpoint."""
    unet_sd = unet.state_dict()
    unet_map = build_keymap(unet_sd, unet.config.layers_per_block)
    cn_map = build_keymap(trained.state_dict(), trained.config.layers_per_block, 6)
    full = {"model.diffusion_model." + unet_map[k]: v for k, v in unet_sd.items()}
    full.update({"control_model." + cn_map[k]: v for k, v in trained.state_dict().items()})
    full.update({"first_stage_model.decoder.conv_out.weight": torch.zeros(3, 4, 3, 3),
                 "betas": torch.linspace(0, 1, 10)})
    torch.save({"state_dict": full, "global_step": 4000}, tmp_path / "control_full.ckpt")
    assert detect_format(full) == "original-full"
    again = load_controlnet(tmp_path / "control_full.ckpt", config=trained.config)
    assert max_diff(residuals(again, unet), residuals(trained, unet)) == 0
    info = inspect_checkpoint(tmp_path / "control_full.ckpt")
    assert info["format"] == "original-full"
    assert info["parameters"] == sum(p.numel() for p in trained.parameters())


def test_fp16_export(tmp_path, unet, trained):
    path = save_controlnet(trained, tmp_path / "half.safetensors", format="original", half=True)
    again = load_controlnet(path)
    assert again.dtype == torch.float16
    assert inspect_checkpoint(path)["dtype"] == "float16"
    ref = residuals(trained, unet)
    assert max_diff(residuals(again.float(), unet), ref) <= 1e-2 * max(r.abs().max().item() for r in ref)
    save_controlnet(trained, tmp_path / "half_diffusers", half=True)
    assert load_controlnet(tmp_path / "half_diffusers").dtype == torch.float16


def test_sd2_conv_projections_load_into_linear_layers(tmp_path):
    from ctrlnet.testbed.tiny import tiny_unet
    unet = tiny_unet("sd21")
    net = randomize(ControlNet.from_unet(unet, conditioning_embedding_out_channels=HINT_CHANNELS))
    sd = net.state_dict()
    keymap = build_keymap(sd, 2, 6)
    # Some SD2.x ControlNets store proj_in/proj_out as 1x1 convs (4-D).
    conv = {"control_model." + keymap[k]: (v[:, :, None, None] if k.endswith(("proj_in.weight", "proj_out.weight"))
                                           else v) for k, v in sd.items()}
    save_file(conv, tmp_path / "c.safetensors", metadata={"ctrlnet_config": json.dumps(net.config.to_dict())})
    again = load_controlnet(tmp_path / "c.safetensors")
    assert max_diff(residuals(again, unet), residuals(net, unet)) == 0


def test_wrong_architecture_is_an_error_listing_keys(tmp_path, trained):
    path = save_controlnet(trained, tmp_path / "c.safetensors", format="original")
    other = known_controlnet_config("sd15")
    with pytest.raises(CheckpointError) as err:
        load_controlnet(path, config=other)
    msg = str(err.value)
    assert "c.safetensors" in msg and "missing" in msg and "shape mismatch" in msg


def test_truncated_file_is_a_clear_error(tmp_path, trained):
    path = save_controlnet(trained, tmp_path / "c.safetensors", format="original")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_controlnet(path)
    pth = save_controlnet(trained, tmp_path / "c.pth", format="original")
    pth.write_bytes(pth.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="c.pth"):
        load_controlnet(pth)


class Exploit:
    def __reduce__(self):
        return (print, ("this code must never run",))


def test_pickle_that_needs_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"control_model.x": Exploit()}, f)
    with pytest.raises(CheckpointError, match="refused"):
        load_controlnet(path)
    assert "must never run" not in capsys.readouterr().out


def test_not_a_controlnet_and_missing_paths(tmp_path):
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(2)}, tmp_path / "unet.safetensors")
    with pytest.raises(CheckpointError, match="not a ControlNet"):
        load_controlnet(tmp_path / "unet.safetensors")
    with pytest.raises(CheckpointError, match="nope.safetensors: no such ControlNet file or folder, and not a "
                                              "bundled name"):
        load_controlnet(tmp_path / "nope.safetensors")
    (tmp_path / "folder").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_controlnet(tmp_path / "folder")


def test_pixel_space_hint_cannot_be_exported_where_formats_cannot_express_it(tmp_path):
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel(in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12,
                                attention_head_dim=2, norm_num_groups=4, sample_size=16)
    net = ControlNet.from_unet(unet, conditioning_embedding_out_channels=HINT_CHANNELS)
    with pytest.raises(CheckpointError, match="downsamples by 1"):
        save_controlnet(net, tmp_path / "d")
    save_controlnet(net, tmp_path / "own", format="ctrlnet")
    assert load_controlnet(tmp_path / "own").config.hint_downsample_factor == 1


def test_a_base_model_is_named_as_such(tmp_path):
    """inspect / load on a base checkpoint (single file, diffusers folder, its UNet, the bundled
    base's name) says it is a base model, naming the file, instead of "no control_model.* keys"."""
    from ctrlnet.base import load_base
    from ctrlnet.testbed.tiny import write_tiny_base
    from helpers import single_file
    folder = write_tiny_base(tmp_path / "base", "sd15")
    save_file(single_file(load_base(folder)), tmp_path / "sd.safetensors")
    cases = [(tmp_path / "sd.safetensors", "sd.safetensors: a Stable Diffusion base model (single-file checkpoint"),
             (folder, "base: a base model folder (StableDiffusionPipeline: model_index.json), not a ControlNet"),
             (folder / "unet" / "diffusion_pytorch_model.safetensors",
              "diffusion_pytorch_model.safetensors: a diffusers UNet's weights (up_blocks.* keys), not a ControlNet"),
             ("nano", "nano: the bundled base model, not a ControlNet")]
    for path, message in cases:
        for reader in (inspect_checkpoint, load_controlnet):
            with pytest.raises(CheckpointError) as e:
                reader(path)
            assert message in str(e.value) and "--base" in str(e.value), str(e.value)
            assert str(e.value).count(str(path)) == 1

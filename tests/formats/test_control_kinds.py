"""Union ControlNets, Control-LoRAs and T2I-Adapters: detection by keys, loading, conversion, inspection."""

import json

import pytest
import torch
from diffusers import ControlNetUnionModel, T2IAdapter
from safetensors.torch import load_file, save_file

from ctrlnet.formats import (CheckpointError, convert_control, detect_kind, inspect_control, kind_of, load_control,
                             save_controlnet)
from ctrlnet.formats.adapter_io import diffusers_to_original, original_to_diffusers, save_adapter
from ctrlnet.formats.control_lora_io import MARKER, save_control_lora
from ctrlnet.models import ControlNet
from ctrlnet.models.adapter import adapter_for_unet
from ctrlnet.models.control_lora import ControlLoRA
from ctrlnet.models.union import ControlNetUnion, union_type_index
from ctrlnet.testbed.tiny import tiny_unet
from conftest import HINT_CHANNELS, make_inputs, randomize


def union_net(unet, types=6, seed=0):
    return randomize(ControlNetUnion.from_unet(unet, num_control_type=types, num_trans_head=2,
                                               conditioning_embedding_out_channels=HINT_CHANNELS), seed)


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def union_outputs(net, unet, types=(3, 1)):
    sample, t, text, cond, kw = make_inputs(unet)
    with torch.no_grad():
        down, mid = net(sample, t, text, condition=[cond, cond.flip(-1)][:len(types)], control_types=list(types), **kw)
    return list(down) + [mid]


# ---------------------------------------------------------------- Union

@pytest.mark.parametrize("types", [6, 8])
def test_union_round_trips_and_diffusers_reads_it(tmp_path, types):
    unet = tiny_unet("sdxl")
    net = union_net(unet, types)
    save_controlnet(net, tmp_path / "union")
    assert json.loads((tmp_path / "union" / "config.json").read_text())["_class_name"] == "ControlNetUnionModel"
    ref, info = ControlNetUnionModel.from_pretrained(tmp_path / "union", output_loading_info=True)
    assert not any(info.values())
    assert kind_of(tmp_path / "union") == "union"
    again = load_control(tmp_path / "union")
    assert isinstance(again, ControlNetUnion) and again.config == net.config
    assert max_diff(union_outputs(again, unet), union_outputs(net, unet)) == 0
    # one file: detected by task_embedding, the 6 / 8 types told apart by its rows
    raw = tmp_path / "raw.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(raw))
    assert detect_kind(load_file(str(raw))) == "union"
    file = save_controlnet(net, tmp_path / "union.safetensors", format="single")
    info = inspect_control(file)
    assert info["kind"] == "union" and info["num_control_type"] == types
    assert info["variant"].startswith("union ProMax" if types == 8 else "union (6")
    loaded = load_control(file)
    assert loaded.config.num_control_type == types
    assert max_diff(union_outputs(loaded, unet), union_outputs(net, unet)) == 0


def test_union_types_by_name_alias_and_index():
    assert union_type_index("canny", 6) == 3 and union_type_index("lineart", 6) == 3
    assert union_type_index("seg", 8) == 5 and union_type_index("tile", 8) == 6 and union_type_index("2", 6) == 2
    with pytest.raises(ValueError, match="tile.*not one of this 6-type"):
        union_type_index("tile", 6)
    with pytest.raises(ValueError, match="out of range"):
        union_type_index(7, 6)


def test_union_has_no_original_layout(tmp_path):
    net = union_net(tiny_unet("sdxl"))
    with pytest.raises(CheckpointError, match="diffusers layout only"):
        save_controlnet(net, tmp_path / "u.safetensors", format="original")
    kind, out = convert_control(save_controlnet(net, tmp_path / "u"), tmp_path / "one.safetensors", "single")
    assert kind == "union" and load_control(out).config == net.config


# ---------------------------------------------------------------- Control-LoRA

def trained_control_lora(unet, rank=3, seed=0):
    net = ControlLoRA.from_unet(unet, rank=rank, conditioning_embedding_out_channels=HINT_CHANNELS)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name not in net.tied:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net


def comfy_merge(unet, file_tensors, plain: ControlNet):
    """ComfyUI's ControlLora.pre_run, written independently on original names: copy the base's tensors,
    then set the file's, merging W + up.flatten(1) @ down.flatten(1) for every .up/.down pair."""
    from ctrlnet.formats.keymap import build_keymap
    c = plain.config
    keymap = build_keymap(plain.state_dict().keys(), c.layers_per_block, len(c.conditioning_embedding_out_channels) * 2 - 2)
    inverse = {o: d for d, o in keymap.items()}
    sd = {k: v.clone() for k, v in unet.state_dict().items() if k in plain.state_dict()}
    for k, v in file_tensors.items():
        if k == MARKER or k.endswith(".down"):
            continue
        if k.endswith(".up"):
            name = inverse[k[:-3] + ".weight"]
            down = file_tensors[k[:-3] + ".down"]
            sd[name] = sd[name] + (v.flatten(1) @ down.flatten(1)).reshape(sd[name].shape)
        else:
            sd[inverse[k]] = v
    plain.load_state_dict(sd)
    return plain


def test_control_lora_file_layout_shares_base_weights_and_matches_comfyui_merge(tmp_path, unet):
    net = trained_control_lora(unet)
    path = save_control_lora(net, tmp_path / "cl.safetensors")
    tensors = load_file(str(path))
    assert tensors[MARKER].numel() == 0 and detect_kind(tensors) == "control_lora"
    ups = [k for k in tensors if k.endswith(".up")]
    assert "input_blocks.1.0.in_layers.2.up" in ups and "input_blocks.0.0.up" in ups
    assert not any(k.endswith(".weight") and k[:-7] + ".up" in tensors for k in tensors)  # no base weights stored
    assert tensors["input_blocks.0.0.up"].shape[1] == 3 and tensors["input_blocks.0.0.down"].shape[:2] == (3, 4)
    assert "zero_convs.0.0.weight" in tensors and "input_hint_block.0.weight" in tensors
    loaded = load_control(path, unet=unet)
    assert isinstance(loaded, ControlLoRA) and loaded.rank == 3
    # the base's tensors are shared, not copied
    assert loaded.down_blocks[0].resnets[0].conv1.weight is unet.down_blocks[0].resnets[0].conv1.weight
    # the file's names, read by diffusers' own converter of Stability's files (ControlNetModel.load_lora_adapter)
    from diffusers.utils.state_dict_utils import convert_sai_sd_control_lora_state_dict_to_peft
    theirs = {k.replace(".lora_B.weight", ".up").replace(".lora_A.weight", ".down"): v for k, v in
              convert_sai_sd_control_lora_state_dict_to_peft(dict(tensors)).items() if v is not None}
    own = loaded.own_state_dict()
    assert theirs.keys() == own.keys() and all(torch.equal(theirs[k], own[k]) for k in own)
    comfy = comfy_merge(unet, tensors, ControlNet(loaded.config))
    sample, t, text, cond, kw = make_inputs(unet)
    with torch.no_grad():
        ref = comfy(sample, t, text, cond, **kw)
        out = loaded(sample, t, text, cond, **kw)
        with loaded.merged():
            merged = loaded(sample, t, text, cond, **kw)
    ref = list(ref[0]) + [ref[1]]
    assert max_diff(list(out[0]) + [out[1]], ref) <= 1e-5 * max(r.abs().max().item() for r in ref)
    assert max_diff(list(merged[0]) + [merged[1]], ref) <= 1e-5 * max(r.abs().max().item() for r in ref)
    assert ref[-1].abs().max() > 0
    info = inspect_control(path)
    assert info["kind"] == "control_lora" and info["rank"] == 3 and info["ranks"][0] <= 3
    assert info["file_bytes"] == path.stat().st_size


def test_control_lora_needs_its_base_and_the_right_one(tmp_path):
    sd15, sdxl = tiny_unet("sd15"), tiny_unet("sdxl")
    path = save_control_lora(trained_control_lora(sd15), tmp_path / "cl.safetensors")
    with pytest.raises(CheckpointError, match="load it with its base"):
        load_control(path)
    with pytest.raises(CheckpointError, match="another base"):
        load_control(path, unet=sdxl)


def test_control_lora_converts_to_a_full_controlnet(tmp_path):
    unet = tiny_unet("sd15")
    net = trained_control_lora(unet)
    path = save_control_lora(net, tmp_path / "cl.safetensors")
    kind, out = convert_control(path, tmp_path / "full", "diffusers", unet=unet)
    full = load_control(out)
    assert kind == "control_lora" and type(full) is ControlNet
    sample, t, text, cond, kw = make_inputs(unet)
    with torch.no_grad():
        a, b = full(sample, t, text, cond), net(sample, t, text, cond)
    assert max_diff(list(a[0]) + [a[1]], list(b[0]) + [b[1]]) <= 1e-5
    with pytest.raises(CheckpointError, match="converts to"):
        convert_control(path, tmp_path / "x", "t2i")


# ---------------------------------------------------------------- T2I-Adapter

def random_adapter(adapter_type, in_channels=3, seed=0, **kw):
    torch.manual_seed(seed)
    channels = {"full_adapter": [8, 16, 16, 16], "full_adapter_xl": [8, 16, 16, 16], "light_adapter": [8, 16, 16]}
    return T2IAdapter(in_channels=in_channels, channels=channels[adapter_type], num_res_blocks=kw.get("nrb", 2),
                      downscale_factor=16 if adapter_type == "full_adapter_xl" else 8, adapter_type=adapter_type)


@pytest.mark.parametrize("adapter_type,in_channels", [("full_adapter", 1), ("full_adapter", 3),
                                                      ("full_adapter_xl", 3), ("light_adapter", 3)])
def test_adapter_original_and_diffusers_layouts(tmp_path, adapter_type, in_channels):
    adapter = randomize(random_adapter(adapter_type, in_channels))
    original = diffusers_to_original(adapter)
    if adapter_type != "light_adapter":  # TencentARC's names: 8 blocks, in_conv where the width changes
        assert "body.7.block2.weight" in original and "body.2.in_conv.weight" in original
        assert original["conv_in.weight"].shape[1] == in_channels * (256 if adapter_type.endswith("xl") else 64)
    else:
        assert "body.3.body.1.block2.weight" in original and "body.0.out_conv.weight" in original
    converted, config = original_to_diffusers(original)
    assert config["adapter_type"] == adapter_type and config["in_channels"] == in_channels
    assert converted.keys() == adapter.state_dict().keys()
    x = torch.rand(1, in_channels, 128, 128)
    for layout, path in (("original", tmp_path / "a.safetensors"), ("diffusers", tmp_path / "folder")):
        save_adapter(adapter, path, format=layout)
        assert kind_of(path) == "t2i_adapter"
        loaded = load_control(path)
        assert isinstance(loaded, T2IAdapter) and loaded.config.adapter_type == adapter_type
        with torch.no_grad():
            assert max_diff(loaded(x), adapter(x)) == 0
        info = inspect_control(path)
        assert info["kind"] == "t2i_adapter" and info["format"] == layout and info["in_channels"] == in_channels
    # the "adapter." prefix TencentARC's loaders strip is accepted
    save_file({"adapter." + k: v.contiguous() for k, v in original.items()}, str(tmp_path / "prefixed.safetensors"))
    assert load_control(tmp_path / "prefixed.safetensors").config.adapter_type == adapter_type
    # diffusers reads our folder
    ref = T2IAdapter.from_pretrained(tmp_path / "folder")
    with torch.no_grad():
        assert max_diff(ref(x), adapter(x)) == 0


def test_adapter_for_a_base_and_conversion(tmp_path):
    unet = tiny_unet("sdxl")
    adapter = adapter_for_unet(dict(unet.config))
    assert adapter.config.adapter_type == "full_adapter_xl" and adapter.config.downscale_factor == 16
    assert adapter_for_unet(dict(tiny_unet("sd15").config)).config.adapter_type == "full_adapter"
    folder = save_adapter(randomize(random_adapter("full_adapter")), tmp_path / "folder")
    kind, out = convert_control(folder, tmp_path / "orig.safetensors", "original")
    assert kind == "t2i_adapter" and "body.0.block1.weight" in load_file(str(out))
    with pytest.raises(CheckpointError, match="converts to diffusers | original"):
        convert_control(folder, tmp_path / "x", "single")


def test_kinds_are_told_apart():
    assert detect_kind(["lora_controlnet", "input_hint_block.0.weight"]) == "control_lora"
    assert detect_kind(["task_embedding", "controlnet_cond_embedding.conv_in.weight"]) == "union"
    assert detect_kind(["conv_in.weight", "body.0.block1.weight"]) == "t2i_adapter"
    assert detect_kind(["adapter.body.0.resnets.0.block1.weight"]) == "t2i_adapter"
    assert detect_kind(["body.0.in_conv.weight"]) == "t2i_adapter"
    assert detect_kind(["control_model.input_hint_block.0.weight"]) == "controlnet"


def test_a_diffusers_layout_adapter_file_without_config_is_inferred(tmp_path):
    """One file with diffusers names and no config.json next to it: the layout is read off the shapes."""
    for adapter_type in ("full_adapter", "light_adapter"):
        adapter = randomize(random_adapter(adapter_type))
        save_file({k: v.contiguous() for k, v in adapter.state_dict().items()}, str(tmp_path / f"{adapter_type}.st"))
        (tmp_path / f"{adapter_type}.st").rename(tmp_path / f"{adapter_type}.safetensors")
        loaded = load_control(tmp_path / f"{adapter_type}.safetensors")
        assert loaded.config.adapter_type == adapter_type and list(loaded.config.channels) == \
            list(adapter.config.channels)


@pytest.mark.parametrize("rows", [1, 64])
def test_lora_layers_factorized_and_merged_agree(rows):
    """Training computes W x + up (down x) where that is cheaper, W' = W + up @ down elsewhere: the same
    outputs and gradients (few positions take the factorized path, many the merged one)."""
    from ctrlnet.models.control_lora import with_lora
    torch.manual_seed(0)
    for layer, x in [(torch.nn.Conv2d(16, 32, 3, padding=1, stride=2), torch.randn(1, 16, rows, 2)),
                     (torch.nn.Conv2d(16, 32, 1), torch.randn(2, 16, rows, 1)),
                     (torch.nn.Linear(48, 40), torch.randn(rows, 48))]:
        lora = with_lora(layer, 4)
        with torch.no_grad():
            lora.up.normal_()
        path = lora.factorized_is_cheaper(x.numel() // x.shape[1 if x.ndim == 4 else -1])
        assert path == (rows == 1)  # each path is taken by one of the cases
        out = lora(x)
        merged = (layer.weight + lora.delta())
        ref = torch.nn.functional.conv2d(x, merged, layer.bias, layer.stride, layer.padding) if x.ndim == 4 else \
            torch.nn.functional.linear(x, merged, layer.bias)
        assert torch.allclose(out, ref, atol=1e-5)
        grads = torch.autograd.grad(out.square().sum(), [lora.up, lora.down])
        ref_grads = torch.autograd.grad(ref.square().sum(), [lora.up, lora.down])
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in zip(grads, ref_grads))


def test_merged_lora_layers_never_read_the_base_weight():
    """In a generation the base's weights may be packed away (prepack in place: empty storage) while the
    merged weights are in use: a LoRA layer must not read its base weight then."""
    from ctrlnet.models.control_lora import with_lora
    torch.manual_seed(0)
    lora = with_lora(torch.nn.Conv2d(8, 8, 3, padding=1), 2)
    x = torch.randn(1, 8, 1, 1)  # few positions: outside merged() the factorized path would read the weight
    expected = lora(x)
    lora._merged = (lora.weight + lora.delta()).detach()
    kept = lora.weight.data
    lora.weight.data = torch.empty(0)
    try:
        assert torch.allclose(lora(x), expected, atol=1e-6)
    finally:
        lora.weight.data, lora._merged = kept, None

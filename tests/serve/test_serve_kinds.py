"""The server with every kind of control network: a Union ControlNet (with pairs), a Control-LoRA and a
T2I-Adapter for the nano base, offered by GET /api/models with their kind and types, used by
POST /api/generate and by A1111's txt2img (union_control_type). In process, through the ASGI app."""

import asyncio

import pytest
import torch

from servekit import asgi_json, b64png

pytest.importorskip("fastapi")

from ctrlnet.base import load_base  # noqa: E402
from ctrlnet.formats import save_controlnet  # noqa: E402
from ctrlnet.formats.adapter_io import save_adapter  # noqa: E402
from ctrlnet.formats.control_lora_io import save_control_lora  # noqa: E402
from ctrlnet.models.adapter import adapter_for_unet  # noqa: E402
from ctrlnet.models.control_lora import ControlLoRA  # noqa: E402
from ctrlnet.models.union import ControlNetUnion  # noqa: E402
from ctrlnet.serve import ServeConfig  # noqa: E402
from ctrlnet.serve import app as http  # noqa: E402
from ctrlnet.serve.extension import union_type  # noqa: E402
from ctrlnet.serve.server import Server  # noqa: E402


def off_zero(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "spatial_ch_projs")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return net


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root = tmp_path_factory.mktemp("kinds")
    unet = load_base("nano").unet
    nets = {"union": save_controlnet(off_zero(ControlNetUnion.from_unet(unet, num_control_type=8)), root / "union"),
            "lora": save_control_lora(off_zero(ControlLoRA.from_unet(unet, rank=4)), root / "cl.safetensors"),
            "adapter": save_adapter(adapter_for_unet(dict(unet.config), num_res_blocks=1), root / "adapter")}
    return Server(ServeConfig(queue=2, max_steps=50, max_images=2, controlnets={k: str(v) for k, v in nets.items()}))


@pytest.fixture(scope="module")
def app(local):
    return http.create_app(local.config, server=local)


def test_models_name_each_kind_and_union_types(local):
    nets = {n["name"]: n for n in local.models()["controlnets"]}
    assert nets["union"]["kind"] == "union" and nets["union"]["types"][:2] == ["openpose", "depth"]
    assert len(nets["union"]["types"]) == 8
    assert nets["lora"]["kind"] == "control_lora" and nets["adapter"]["kind"] == "t2i_adapter"
    assert nets["nano-canny"]["kind"] == "controlnet" and nets["nano-canny"]["types"] == []


def test_generate_with_every_kind(app, shapes_sample):
    _, maps = shapes_sample
    edges, seg = b64png(maps["canny"]), b64png(maps["segmentation"])
    controls = [{"model": "union", "image": edges, "type": "canny", "pairs": [{"image": seg, "type": "segment"}]},
                {"model": "lora", "image": edges, "scale": 0.8},
                {"model": "adapter", "image": edges, "scale": 0.5, "mode": "control"},
                {"model": "nano-canny", "image": edges}]
    status, _, out = asyncio.run(asgi_json(app, "POST", "/api/generate",
                                           {"prompt": "a red circle", "steps": 2, "controls": controls}))
    assert status == 200, out
    assert len(out["images"]) == 1 and "Type: canny+segment" in out["parameters"][0]
    for unit, words in [({"model": "union", "image": edges}, "needs type="),
                        ({"model": "union", "image": edges, "type": "sky"}, "'sky' is not one of"),
                        ({"model": "adapter", "image": edges, "scale": [1, 2]}, "one scale"),
                        ({"model": "lora", "image": edges, "type": "canny"}, "type= applies to Union")]:
        status, _, out = asyncio.run(asgi_json(app, "POST", "/api/generate",
                                               {"prompt": "x", "steps": 2, "controls": [unit]}))
        assert status == 400 and words in out["error"], out


def test_a1111_union_control_type(app, shapes_sample):
    assert union_type("Canny/Lineart/Anime Lineart/MLSD", "u") == "canny"
    assert union_type("Normal Map", "u") == "normal" and union_type("Unknown", "u") == ""
    assert union_type("Soft Edge", "u") == "hed" and union_type("Inpaint", "u") == "repaint"
    _, maps = shapes_sample
    unit = {"module": "none", "model": "union", "image": b64png(maps["canny"]), "union_control_type": "Canny/Lineart"}
    body = {"prompt": "a red circle", "steps": 2, "alwayson_scripts": {"controlnet": {"args": [unit]}}}
    status, _, out = asyncio.run(asgi_json(app, "POST", "/sdapi/v1/txt2img", body))
    assert status == 200, out
    assert "Type: canny" in out["info"]
    status, _, out = asyncio.run(asgi_json(app, "POST", "/sdapi/v1/txt2img", {
        **body, "alwayson_scripts": {"controlnet": {"args": [{**unit, "union_control_type": "Unknown"}]}}}))
    assert status == 400 and "needs type=" in out["detail"], out
    # a classic ControlNet unit with a union label: ignored, as the extension does
    status, _, out = asyncio.run(asgi_json(app, "POST", "/sdapi/v1/txt2img", {
        **body, "alwayson_scripts": {"controlnet": {"args": [{**unit, "model": "nano-canny"}]}}}))
    assert status == 200, out

"""A1111's API as its clients use it: the real `webuiapi` client (PyPI) and raw requests shaped as
the Photoshop plugin and openOutpaint send them, against the running `ctrlnet serve` subprocess
(nano models, conftest's `server`). Every image is checked against the same generation through
the Python Pipeline."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from servekit import b64png

webuiapi = pytest.importorskip("webuiapi")

from ctrlnet import Control, Pipeline  # noqa: E402
from ctrlnet.annotators import get_annotator  # noqa: E402


@pytest.fixture(scope="module")
def api(server):
    host, port = server.url.removeprefix("http://").split(":")
    return webuiapi.WebUIApi(host=host, port=int(port))


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained("nano", controlnets=["nano-canny", "nano-segmentation"])


def same(got: Image.Image, want, tol: int = 2):
    """Same computation in two processes: threads may round differently by a level or two."""
    diff = np.abs(np.asarray(got.convert("RGB")).astype(int) - np.asarray(want).astype(int))
    assert diff.max() <= tol, diff.max()


def raw(a: np.ndarray) -> Image.Image:
    return Image.fromarray(a)


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


# ---------------------------------------------------------------------- webuiapi

def test_txt2img_equals_the_pipeline(api, pipe, shapes_sample):
    sample, _ = shapes_sample
    r = api.txt2img(prompt=sample.prompt, negative_prompt="blurry", seed=7, steps=4, cfg_scale=5, width=128,
                    height=128, batch_size=2)
    ref = pipe(sample.prompt, negative_prompt="blurry", steps=4, guidance=5, seed=7, num_images=2,
               scheduler="euler_a")  # webuiapi's default sampler, "Euler a"
    assert len(r.images) == 2 and r.images[0].size == (128, 128)
    for got, want in zip(r.images, ref.images):
        same(got, want)
    assert r.info["all_seeds"] == [7, 8] and r.info["seed"] == 7 and r.info["sampler_name"] == "Euler a"
    assert r.info["prompt"] == sample.prompt and r.info["cfg_scale"] == 5 and r.info["steps"] == 4
    assert r.images[0].info["parameters"] == r.info["infotexts"][0] and "Seed: 7" in r.info["infotexts"][0]
    assert r.parameters["prompt"] == sample.prompt and r.parameters["steps"] == 4  # the request, echoed


def test_n_iter_makes_the_seeds_of_one_batch(api, pipe, shapes_sample):
    """batch_size x n_iter images, image i with seed + i, as A1111 - with a deterministic sampler the
    two iterations equal one batch of two."""
    sample, _ = shapes_sample
    r = api.txt2img(prompt=sample.prompt, seed=11, steps=3, width=128, height=128, sampler_name="DDIM", n_iter=2)
    ref = pipe(sample.prompt, steps=3, guidance=7, seed=11, num_images=2, scheduler="ddim")
    assert len(r.images) == 2 and r.info["all_seeds"] == [11, 12]
    for got, want in zip(r.images, ref.images):
        same(got, want)


def test_one_and_two_controlnet_units(api, pipe, shapes_sample):
    sample, maps = shapes_sample
    unit = webuiapi.ControlNetUnit(image=raw(maps["target"]), module="canny", model="nano-canny")
    r = api.txt2img(prompt=sample.prompt, seed=3, steps=3, width=128, height=128, controlnet_units=[unit])
    # webuiapi's unit defaults: Resize and Fill, processor_res 512, thresholds 64/64 (in canny's range)
    canny = Control("nano-canny", maps["target"], annotator="canny", resize_mode="resize_and_fill",
                    annotator_params={"low": 64, "high": 64, "detect_resolution": 512})
    ref = pipe(sample.prompt, controls=[canny], steps=3, guidance=7, seed=3, scheduler="euler_a")
    assert len(r.images) == 2  # the image, then the detected map (as the extension appends it)
    same(r.images[0], ref.images[0])
    assert np.array_equal(np.asarray(r.images[1].convert("RGB")), ref.conditions[0])
    assert 'ControlNet 0: "Module: canny, Model: nano-canny' in r.info["infotexts"][0]

    # "Segmentation": matched as a substring of nano-segmentation, as the extension does
    seg = webuiapi.ControlNetUnit(image=raw(maps["segmentation"]), module="none", model="Segmentation",
                                  weight=0.8, guidance_end=0.5, control_mode=2, resize_mode="Crop and Resize")
    r = api.txt2img(prompt=sample.prompt, seed=3, steps=3, width=128, height=128, controlnet_units=[unit, seg])
    seg_control = Control("nano-segmentation", maps["segmentation"], scale=0.8, end=0.5, mode="control")
    ref = pipe(sample.prompt, controls=[canny, seg_control], steps=3, guidance=7, seed=3, scheduler="euler_a")
    assert len(r.images) == 3
    same(r.images[0], ref.images[0])
    assert np.array_equal(np.asarray(r.images[2].convert("RGB")), ref.conditions[1])


def test_img2img_with_a_mask_and_a_unit_on_the_init_image(api, pipe, shapes_sample):
    sample, maps = shapes_sample
    mask = np.zeros((128, 128, 3), np.uint8)
    mask[32:96, 40:100] = 255
    unit = webuiapi.ControlNetUnit(module="canny", model="nano-canny", pixel_perfect=True)  # no image: the init's
    r = api.img2img(images=[raw(maps["target"])], mask_image=raw(mask), prompt=sample.prompt, seed=5, steps=4,
                    width=128, height=128, denoising_strength=0.6, sampler_name="DDIM", controlnet_units=[unit])
    control = Control("nano-canny", maps["target"], annotator="canny", resize_mode="just_resize",
                      annotator_params={"low": 64, "high": 64})
    ref = pipe(sample.prompt, controls=[control], init_image=maps["target"], mask=mask, strength=0.6, steps=4,
               guidance=7, seed=5, scheduler="ddim")
    assert len(r.images) == 2
    same(r.images[0], ref.images[0])
    assert r.info["denoising_strength"] == 0.6 and r.parameters["init_images"] is None  # not echoed back
    # outside the mask the init image is kept
    got = np.asarray(r.images[0].convert("RGB")).astype(int)
    assert np.abs(got - maps["target"].astype(int))[mask[..., 0] == 0].mean() < \
        np.abs(got - maps["target"].astype(int))[mask[..., 0] > 0].mean()


def test_detect_and_the_lists(api, server, shapes_sample):
    _, maps = shapes_sample
    r = api.controlnet_detect([raw(maps["target"])], module="canny", processor_res=256, threshold_a=50,
                              threshold_b=150)
    want = get_annotator("canny", low=50, high=150, detect_resolution=256, image_resolution=256)(maps["target"])
    assert r.info == "Success" and len(r.images) == 1
    assert np.array_equal(np.asarray(r.images[0].convert("RGB")), want)
    assert api.controlnet_version() >= 2
    titles = api.controlnet_model_list()
    assert any(t.startswith("nano-canny [") for t in titles)
    assert any(t.startswith("nano-segmentation [") for t in titles)
    modules = api.controlnet_module_list()
    assert {"none", "canny", "invert", "scribble_xdog", "tile_resample"} <= set(modules)
    assert "hed" not in modules  # its weights are not on this (test) server: not offered
    models = api.get_sd_models()
    assert [m["model_name"] for m in models] == ["nano"] and api.util_get_current_model() == models[0]["title"]
    api.util_set_model("nano")  # the loaded one: accepted
    assert "Euler a" in api.util_get_sampler_names() and "karras" in api.util_get_scheduler_names()
    assert api.has_controlnet  # webuiapi found "controlnet m2m" in /sdapi/v1/scripts
    progress = api.get_progress()
    assert progress["progress"] == 0 and progress["state"]["job_count"] == 0
    api.util_wait_for_ready(check_interval=0.1)  # returns at once: progress 0 and no job
    assert api.interrupt() == {}  # nothing running: no effect on the next one


def test_switching_to_a_base_that_is_not_loaded_is_a_4xx(api):
    r = api.session.post(f"{api.baseurl}/options", json={"sd_model_checkpoint": "sd_xl_base_1.0.safetensors"})
    assert r.status_code == 400 and "sd_xl_base_1.0" in r.json()["detail"] and "nano" in r.json()["detail"]
    r = api.session.post(f"{api.baseurl}/txt2img", json={"prompt": "x", "steps": 1, "override_settings": {
        "sd_model_checkpoint": "other"}})
    assert r.status_code == 400 and "other" in r.json()["detail"]


# ---------------------------------------------------------------------- raw requests of other clients

def test_photoshop_plugin_units_with_legacy_keys(server, pipe, shapes_sample):
    """One dict per unit slot, disabled ones with empty module and model; input_image, lowvram,
    guessmode, mask "" and thresholds 0 (out of canny's range: its defaults)."""
    sample, maps = shapes_sample
    slots = [{"enabled": True, "input_image": b64png(maps["target"]), "mask": "", "module": "canny",
              "model": "nano-canny", "weight": 1, "resize_mode": "Crop and Resize", "lowvram": True,
              "processor_res": 512, "threshold_a": 0, "threshold_b": 0, "guidance_start": 0, "guidance_end": 1,
              "guessmode": False, "pixel_perfect": True},
             {"enabled": False, "input_image": "", "mask": "", "module": "", "model": ""},
             {"enabled": False, "module": "", "model": ""}]
    status, r, _ = server.post("/sdapi/v1/txt2img", {
        "prompt": sample.prompt, "seed": 2, "steps": 2, "width": 128, "height": 128, "sampler_index": "Euler a",
        "controlnet_units": slots, "alwayson_scripts": {"controlnet": {"args": slots}}})
    assert status == 200, r
    control = Control("nano-canny", maps["target"], annotator="canny")  # pixel perfect, canny's own 100/200
    ref = pipe(sample.prompt, controls=[control], steps=2, guidance=7, seed=2, scheduler="euler_a")
    assert len(r["images"]) == 2
    same(decode(r["images"][0]), ref.images[0])
    assert np.array_equal(np.asarray(decode(r["images"][1]).convert("RGB")), maps["canny"])


def test_openoutpaint_img2img(server, shapes_sample):
    """Data URLs, the lowercase script key, a unit on the init image and mask, and a stale empty
    ControlNet entry of webuiapi's."""
    sample, maps = shapes_sample
    mask = np.zeros((128, 128, 3), np.uint8)
    mask[:, 64:] = 255
    status, r, _ = server.post("/sdapi/v1/img2img", {
        "prompt": sample.prompt, "seed": 1, "steps": 2, "width": 128, "height": 128, "sampler_name": "DDIM",
        "denoising_strength": 0.5, "init_images": ["data:image/png;base64," + b64png(maps["target"])],
        "mask": "data:image/png;base64," + b64png(mask), "inpainting_mask_invert": 0, "mask_blur": 4,
        "inpaint_full_res": False, "alwayson_scripts": {
            "controlnet": {"args": [{"enabled": True, "module": "none", "model": "nano-canny",
                                     "control_mode": "Balanced", "processor_res": 64,
                                     "resize_mode": "Just Resize"}]},
            "ControlNet": {"args": []}}})
    assert status == 200, r
    assert len(r["images"]) == 2 and decode(r["images"][0]).size == (128, 128)
    info = __import__("json").loads(r["info"])
    assert info["all_seeds"] == [1]
    got = np.asarray(decode(r["images"][0]).convert("RGB")).astype(int)
    change = np.abs(got - maps["target"].astype(int)).mean(axis=(0, 2))  # per column
    assert change[:64].mean() < change[64:].mean()  # the unmasked left half is kept, the right repainted


@pytest.mark.parametrize("change, status, words", [
    ({"module": "depth_zoe"}, 422, ["depth_zoe"]),
    ({"module": "no_such_module"}, 422, ["no_such_module"]),
    ({"model": "control_v11p_sd15_canny [d14c016b]"}, 422, ["control_v11p_sd15_canny", "nano-canny"]),
    ({"model": "None"}, 422, ["model"]),
    ({"weight": 20}, 400, ["scale"]),
    ({"guidance_start": 0.8, "guidance_end": 0.2}, 400, ["start"]),
    ({"resize_mode": "Stretch"}, 422, ["Stretch"]),
    ({"image": ""}, 400, ["image"]),
])
def test_bad_units_are_4xx_naming_the_field(server, shapes_sample, change, status, words):
    _, maps = shapes_sample
    unit = {"enabled": True, "image": b64png(maps["target"]), "module": "canny", "model": "nano-canny", **change}
    code, r, _ = server.post("/sdapi/v1/txt2img", {"prompt": "x", "steps": 1, "width": 128, "height": 128,
                                                   "alwayson_scripts": {"ControlNet": {"args": [unit]}}})
    assert code == status, r
    assert set(r) == {"error", "detail", "body", "errors"}
    for w in words:
        assert w in r["detail"], r


def test_limits(server, shapes_sample):
    _, maps = shapes_sample
    unit = {"image": b64png(maps["canny"]), "model": "nano-canny"}
    code, r, _ = server.post("/sdapi/v1/txt2img", {"prompt": "x", "steps": 1, "alwayson_scripts": {
        "controlnet": {"args": [unit] * 20}}})
    assert code == 400 and "20 enabled units" in r["detail"]
    # a small PNG that decodes to 4 MP against the server's 1 MP: refused from its header
    code, r, _ = server.post("/sdapi/v1/img2img", {"prompt": "x", "steps": 1, "init_images": [
        b64png(np.zeros((2000, 2000, 3), np.uint8))]})
    assert code == 413 and "1,000,000 pixels" in r["detail"]
    code, r, _ = server.post("/sdapi/v1/txt2img", {"prompt": "x", "steps": 1, "batch_size": 2, "n_iter": 2})
    assert code == 400 and "batch_size x n_iter" in r["detail"]
    code, r, _ = server.post("/sdapi/v1/txt2img", {"prompt": "x", "steps": 1, "enable_hr": True})
    assert code == 400 and "enable_hr" in r["detail"]
    code, r, _ = server.post("/sdapi/v1/txt2img", {"prompt": "x", "steps": 1, "alwayson_scripts": {
        "ADetailer": {"args": [True, {}]}}})
    assert code == 422 and "ADetailer" in r["detail"]
    assert server.get("/api/health")[0] == 200


# ---------------------------------------------------------------------- --api-auth, over a real socket

def test_webuiapi_with_credentials(tmp_path_factory, shapes_sample):
    """A second server with --api-auth: webuiapi with the credentials works; without them, or with
    wrong ones, every route answers 401 (webuiapi raises on txt2img, returns the body elsewhere)."""
    from servekit import launch, stop
    auth = "Basic " + base64.b64encode(b"alice:s3cret").decode()
    server = launch(["--api-auth", "alice:s3cret"], tmp_path_factory.mktemp("auth") / "server.log",
                    tmp_path_factory.mktemp("no-weights"), headers={"Authorization": auth})
    try:
        host, port = server.url.removeprefix("http://").split(":")
        good = webuiapi.WebUIApi(host=host, port=int(port), username="alice", password="s3cret")
        assert good.util_get_current_model().startswith("nano [") and good.has_controlnet
        r = good.txt2img(prompt="x", steps=1, width=128, height=128)
        assert len(r.images) == 1
        for api in (webuiapi.WebUIApi(host=host, port=int(port)),
                    webuiapi.WebUIApi(host=host, port=int(port), username="alice", password="wrong")):
            assert api.get_options()["detail"] == "Incorrect username or password"
            with pytest.raises(RuntimeError, match="401"):
                api.txt2img(prompt="x", steps=1)
        status, headers, _ = server.request("GET", "/controlnet/model_list")
        assert status == 401 and headers["www-authenticate"].startswith("Basic")
    finally:
        stop(server)

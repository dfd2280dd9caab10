"""The A1111 side of `ctrlnet serve`, in this process: the ControlNet extension's vocabulary
(extension.py: modules, sliders, modes, unit dicts, model names and hashes) as pure functions,
A1111.sampler and A1111.prepare's refusals on one loaded nano Server, and the whole ASGI app
driven without sockets for interrupt, basic auth, A1111-shaped errors and the /controlnet lists.
No mocks of the code under test; where a generation must be held, an Event holds it."""

import asyncio
import base64
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from servekit import asgi_call, asgi_json, b64png, wait_until

pytest.importorskip("fastapi")

from ctrlnet.serve import ServeConfig  # noqa: E402
from ctrlnet.serve import app as http  # noqa: E402
from ctrlnet.serve import extension as ext  # noqa: E402
from ctrlnet.serve.a1111 import A1111, Img2ImgRequest, Txt2ImgRequest  # noqa: E402
from ctrlnet.serve.config import check_exposure, credentials  # noqa: E402
from ctrlnet.serve.server import ApiError, Server  # noqa: E402

CONFIG = ServeConfig(queue=1, max_upload_mb=1, max_pixels=1_000_000, max_steps=50, max_images=2)
TITLES = {"nano-canny [d170e8ed]": "nano-canny", "nano-segmentation [1a304781]": "nano-segmentation"}


@pytest.fixture(scope="module")
def local():
    return Server(CONFIG)


@pytest.fixture(scope="module")
def app(local):
    return http.create_app(CONFIG, server=local)


@pytest.fixture(scope="module")
def api(local):
    return A1111(local)


def cn(**fields) -> dict:
    """A canny unit dict; its image is only a string here (extension.py never decodes it)."""
    return {"module": "canny", "model": "nano-canny", "image": "IMG", **fields}


def unit(raw: dict) -> ext.Unit:
    return ext.unit(raw, 0, TITLES, "u")


def scripts(*units) -> dict:
    return {"controlnet": {"args": list(units)}}


# ---------------------------------------------------------------------- extension.py: units

def test_legacy_spellings_are_read():
    u = unit({"input_image": "IMG", "module": "canny", "model": "nano-canny", "guidance": 0.5, "lowvram": True,
              "mask_image": ""})
    assert (u.image, u.end) == ("IMG", 0.5)
    assert unit(cn(input_image="IMG")).image == "IMG"  # both spellings, same value: fine


@pytest.mark.parametrize("old, new, a, b", [("input_image", "image", "A", "B"), ("guidance", "guidance_end", 0.5, 0.7),
                                            ("lowvram", "low_vram", True, False), ("mask_image", "mask", "M", "N")])
def test_old_and_new_spelling_with_different_values_is_refused(old, new, a, b):
    with pytest.raises(ValueError, match=f"both '{old}' and '{new}'"):
        unit({**cn(), old: a, new: b})


def test_disabled_units_and_non_dicts_are_skipped_before_validation():
    """Clients send one dict per slot; an unused slot may hold anything, even an invalid model."""
    args = [{"enabled": False, "module": "", "model": ""}, None, True, "x", 3,
            {"enabled": False, "module": "no such module", "model": "None"},
            cn(), {"module": "canny", "model": "nano-segmentation", "image": "IMG"}]  # missing enabled = true
    assert [(u.index, u.model) for u in ext.units(args, TITLES)] == [(6, "nano-canny"), (7, "nano-segmentation")]
    assert ext.units(None, TITLES) == []
    with pytest.raises(ValueError, match="must be a list"):
        ext.units({"enabled": True}, TITLES)


@pytest.mark.parametrize("image, expected", [
    ("IMG", "IMG"), ({"image": "IMG", "mask": None}, "IMG"), ({"image": "IMG", "mask": ""}, "IMG"),
    (["IMG", ""], "IMG"), (["IMG", None], "IMG"), ("", None), (None, None), ({"image": "", "mask": None}, None)])
def test_image_forms(image, expected):
    assert unit(cn(image=image)).image == expected


@pytest.mark.parametrize("fields", [{"image": {"image": "IMG", "mask": "M"}}, {"image": ["IMG", "M"]},
                                    {"mask": "M"}, {"mask_image": "M"}])
def test_a_unit_mask_is_refused_naming_mask(fields):
    with pytest.raises(ValueError, match=r"u\.mask: unit masks are not supported"):
        unit({**cn(), **fields})


@pytest.mark.parametrize("v, expected", [
    ("Just Resize", "just_resize"), ("crop and resize", "crop_and_resize"), ("Resize and Fill", "resize_and_fill"),
    ("Inner Fit (Scale to Fit)", "crop_and_resize"), ("Scale to Fit (Inner Fit)", "crop_and_resize"),
    ("Outer Fit (Shrink to Fit)", "resize_and_fill"), ("Envelope (Outer Fit)", "resize_and_fill"),
    (0, "just_resize"), (1, "crop_and_resize"), (2, "resize_and_fill"), ("2", "resize_and_fill"),
    (3, "just_resize")])
def test_resize_modes(v, expected):
    assert ext.resize_mode(v, "here") == expected
    assert unit(cn(resize_mode=v)).resize_mode == expected


@pytest.mark.parametrize("v, expected", [("Balanced", "balanced"), ("My prompt is more important", "prompt"),
                                         ("ControlNet is more important", "control"), (0, "balanced"),
                                         (1, "prompt"), (2, "control")])
def test_control_modes(v, expected):
    assert ext.control_mode(v, "here") == expected == unit(cn(control_mode=v)).mode


@pytest.mark.parametrize("fn, v", [(ext.resize_mode, "Stretch"), (ext.resize_mode, 4), (ext.resize_mode, True),
                                   (ext.control_mode, 3), (ext.control_mode, "loud")])
def test_unknown_modes_are_refused_naming_where(fn, v):
    with pytest.raises(ValueError, match=f"here: unknown .* mode {v!r}"):
        fn(v, "here")


def test_guessmode_means_controlnet_is_more_important_unless_control_mode_is_given():
    assert unit(cn(guessmode=True)).mode == unit(cn(guess_mode=True)).mode == "control"
    assert unit(cn(guessmode=True, control_mode="Balanced")).mode == "balanced"
    assert unit(cn()).mode == "balanced"


@pytest.mark.parametrize("fields, params", [
    ({"processor_res": 512, "threshold_a": 64, "threshold_b": 64}, {"low": 64, "high": 64, "detect_resolution": 512}),
    ({"processor_res": -1, "threshold_a": -1, "threshold_b": -1}, {"low": 100, "high": 200, "detect_resolution": 512}),
    ({}, {"low": 100, "high": 200, "detect_resolution": 512}),
    ({"processor_res": 4000, "threshold_a": 300, "threshold_b": True}, {"low": 100, "high": 200,
                                                                         "detect_resolution": 512}),
    ({"processor_res": 256, "threshold_a": 20.4}, {"low": 20, "high": 200, "detect_resolution": 256}),
    ({"processor_res": 512, "pixel_perfect": True}, {"low": 100, "high": 200}),
    ({"module": "mlsd", "threshold_a": 64, "threshold_b": 64}, {"thr_v": 0.1, "thr_d": 0.1, "detect_resolution": 512}),
    ({"module": "mlsd", "threshold_a": 0.5, "threshold_b": 5}, {"thr_v": 0.5, "thr_d": 5.0, "detect_resolution": 512}),
    ({"module": "none", "processor_res": 512, "threshold_a": 64}, {}),
])
def test_sliders_keep_in_range_values_and_reset_the_rest(fields, params):
    """The extension's rule: out of range (webuiapi's 64/64 on mlsd) or -1 is the slider's default."""
    assert unit(cn(**fields)).params == params


@pytest.mark.parametrize("name, label, annotator", [
    ("depth", "depth_midas", "depth_midas"), ("depth_midas", "depth_midas", "depth_midas"),
    ("hed", "softedge_hed", "softedge_hed"), ("softedge_hed", "softedge_hed", "softedge_hed"),
    ("lineart", "lineart_realistic", "lineart_realistic"), ("lineart_dog", "lineart_dog", "lineart"),
    ("Canny", "canny", "canny"), ("invert", "invert (from white bg & black line)", "invert"),
    ("inpaint", "inpaint_global_harmonious", "inpaint"), ("none", "none", "")])
def test_labels_and_internal_names_resolve(name, label, annotator):
    assert ext.module(name)[0] == label and ext.module(name)[1].annotator == annotator
    assert unit(cn(module=name)).annotator == annotator


@pytest.mark.parametrize("fields, words", [({"module": "nope"}, "u.module: unknown module 'nope'"),
                                           ({"model": "None"}, "u.model: no ControlNet model selected"),
                                           ({"model": ""}, "u.model: no ControlNet model selected"),
                                           ({"model": "depth-net"}, "u.model: unknown ControlNet 'depth-net'"),
                                           ({"weight": "strong"}, "u.weight: expected a number")])
def test_unknown_module_or_model_is_refused_naming_it(fields, words):
    with pytest.raises(ValueError) as e:
        unit(cn(**fields))
    assert words in str(e.value)


def test_match_model():
    titles = {**TITLES, "control_v11p_sd15_canny [d14c016b]": "control_v11p_sd15_canny"}
    assert ext.match_model("nano-canny [d170e8ed]", titles) == "nano-canny"  # exact title
    assert ext.match_model("NANO-Segmentation", titles) == "nano-segmentation"  # bare name, any case
    assert ext.match_model("canny", titles) == "nano-canny"  # the shortest name containing it
    assert ext.match_model("seg", titles) == "nano-segmentation"
    assert ext.match_model("nano-canny [00000000]", titles) == "nano-canny"  # another copy's hash
    assert ext.match_model("depth", titles) is None and ext.match_model("", titles) is None


def test_model_hash_is_a1111s_old_hash(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 0x130000, dtype=np.uint8).tobytes()
    (tmp_path / "m.safetensors").write_bytes(data)
    expected = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert ext.model_hash(tmp_path / "m.safetensors") == expected
    assert ext.model_hash(tmp_path) == expected  # a folder: its first .safetensors
    (tmp_path / "short.bin").write_bytes(b"x" * 100)
    assert ext.model_hash(tmp_path / "short.bin") == hashlib.sha256(b"").hexdigest()[:8]


# ---------------------------------------------------------------------- A1111.sampler

@pytest.mark.parametrize("name, schedule, expected", [
    ("Euler a", None, ("Euler a", "euler_a")), ("DPM++ 2M", "automatic", ("DPM++ 2M", "dpmpp_2m_karras")),
    ("DPM++ 2M Karras", None, ("DPM++ 2M", "dpmpp_2m_karras")), ("DPM++ 2M", "uniform", ("DPM++ 2M", "dpmpp_2m")),
    ("DPM++ 2M", "Karras", ("DPM++ 2M", "dpmpp_2m_karras")), ("k_euler_a", None, ("Euler a", "euler_a")),
    ("ddim", None, ("DDIM", "ddim")), ("dpmpp_2m", None, ("DPM++ 2M", "dpmpp_2m")),
    ("euler-a", None, ("Euler a", "euler_a"))])
def test_sampler_names(name, schedule, expected):
    assert A1111.sampler(name, schedule) == expected


@pytest.mark.parametrize("name, schedule, words", [
    ("Euler", "karras", ["scheduler", "Karras", "DPM++ 2M"]), ("Euler Karras", None, ["scheduler", "Karras"]),
    ("Heun", None, ["sampler_name", "'Heun'"]), ("Euler", "exponential", ["scheduler", "'exponential'"])])
def test_sampler_refusals(name, schedule, words):
    with pytest.raises(ApiError) as e:
        A1111.sampler(name, schedule)
    assert e.value.status == 400 and all(w in e.value.message for w in words), e.value.message


@pytest.mark.parametrize("name, karras", [("euler", None), ("dpmpp_2m", "dpmpp_2m_karras")])
def test_our_own_sampler_names_honour_the_scheduler_field(name, karras):
    """Our own names with ``scheduler: karras``: Karras where offered (``karras``), else the same
    400 as for A1111's names - never another sampler than asked for, silently (it once was)."""
    if karras is None:
        with pytest.raises(ApiError) as e:
            A1111.sampler(name, "karras")
        assert e.value.status == 400 and "scheduler" in e.value.message, e.value.message
    else:
        assert A1111.sampler(name, "karras")[1] == karras


# ---------------------------------------------------------------------- A1111.prepare

@pytest.mark.parametrize("fields, status, words", [
    ({"enable_hr": True}, 400, ["enable_hr"]), ({"restore_faces": True}, 400, ["restore_faces"]),
    ({"tiling": True}, 400, ["tiling"]), ({"styles": ["Cinematic"]}, 400, ["styles"]),
    ({"subseed_strength": 0.3}, 400, ["subseed_strength"]), ({"refiner_checkpoint": "r"}, 400, ["refiner_checkpoint"]),
    ({"script_name": "x/y/z plot"}, 422, ["script_name", "x/y/z plot"]),
    ({"batch_size": 2, "n_iter": 2}, 400, ["batch_size x n_iter", "limit of 2"]),
    ({"batch_size": 0}, 400, ["batch_size"]), ({"steps": 51}, 400, ["steps: 51"]),
    ({"width": 2048}, 400, ["width: 2048"]), ({"height": 4096}, 400, ["height: 4096"]),
    ({"seed": 4294967295, "batch_size": 2}, 400, ["seed"]), ({"sampler_name": "Heun"}, 400, ["'Heun'"]),
    ({"override_settings": {"sd_model_checkpoint": "sdxl [12345678]"}}, 400,
     ["override_settings.sd_model_checkpoint", "sdxl"]),
    ({"alwayson_scripts": {"ADetailer": {"args": [{"ad_model": "face"}]}}}, 422, ["'ADetailer' not found"]),
    ({"alwayson_scripts": scripts(cn(module="nope"))}, 422, ["args[0].module", "'nope'"]),
    ({"alwayson_scripts": scripts(cn(image=""))}, 400, ["args[0].image: no image"]),
    ({"alwayson_scripts": scripts(cn(image="", module="inpaint_only"))}, 400, ["args[0].module", "needs img2img"]),
    ({"alwayson_scripts": scripts(cn(guidance_start=0.8, guidance_end=0.2))}, 400, ["args[0]", "start <= end"]),
    ({"alwayson_scripts": scripts(*[cn()] * 20)}, 400, ["20 enabled units", "allows 4"]),
])
def test_prepare_refuses_naming_the_field(api, shapes_sample, fields, status, words):
    if "alwayson_scripts" in fields:  # the units' "IMG" becomes a real image
        fields = json.loads(json.dumps(fields).replace('"IMG"', json.dumps(b64png(shapes_sample[1]["canny"]))))
    with pytest.raises(ApiError) as e:
        api.prepare(Txt2ImgRequest(**{"steps": 2, **fields}))
    assert e.value.status == status and all(w in e.value.message for w in words), e.value.message


@pytest.mark.parametrize("fields, words", [({}, ["init_images"]), ({"init_images": ["A", "B"]}, ["init_images: 2"]),
                                           ({"init_images": ["INIT"], "alwayson_scripts": scripts(
                                               {"module": "inpaint_only", "model": "nano-canny"})},
                                            ["inpaint_only needs img2img with a mask"])])
def test_img2img_refusals(api, shapes_sample, fields, words):
    fields = json.loads(json.dumps(fields).replace('"INIT"', json.dumps(b64png(shapes_sample[1]["target"]))))
    with pytest.raises(ApiError) as e:
        api.prepare(Img2ImgRequest(**{"steps": 2, **fields}))
    assert e.value.status == 400 and all(w in e.value.message for w in words), e.value.message


def test_prepare_accepts_what_a1111_clients_send(api, local, shapes_sample):
    """Disabled slots (19 of 20), an empty stale script, seed -1 and no size: one control, a drawn
    seed that leaves room for every image, the base's native size, webuiapi's defaults."""
    img = b64png(shapes_sample[1]["canny"])
    job = api.prepare(Txt2ImgRequest(steps=2, seed=-1, batch_size=2, alwayson_scripts={
        "ControlNet": {"args": [{**cn(enabled=False), "model": "None"}] * 19 + [cn(image=img)]},
        "ADetailer": {"args": []}, "controlnet m2m": {}}))
    assert len(job.controls) == 1 and job.controls[0].model == "nano-canny"
    assert job.controls[0].annotator_params == {"low": 100, "high": 200, "detect_resolution": 512}
    assert isinstance(job.seed, int) and 0 <= job.seed and job.seed + 1 <= 2 ** 32 - 1
    plain = api.prepare(Txt2ImgRequest(steps=2))
    assert (plain.width, plain.height) == (local.pipe.native_size,) * 2 == (128, 128)
    assert plain.scheduler == "euler" and plain.steps == 2 and plain.controls == []


def test_img2img_mask_invert_and_units_without_image(api, shapes_sample):
    """The mask is resized with the init image and inverted on request; a unit without image works
    on the (full) init image with img2img's resize mode, not its own; the echo drops the images."""
    target = shapes_sample[1]["target"]
    init = np.ascontiguousarray(target[:, :96])  # 128x96: resized to 128x128 for the init only
    mask = np.zeros((64, 48, 3), np.uint8)
    mask[:, :24] = 255
    base = dict(init_images=[b64png(init)], mask=b64png(mask), width=128, height=128, resize_mode=1, steps=2,
                alwayson_scripts=scripts({"module": "canny", "model": "nano-canny", "resize_mode": "Just Resize"}))
    plain, inverted = api.prepare(Img2ImgRequest(**base)), api.prepare(Img2ImgRequest(**base, inpainting_mask_invert=1))
    assert plain.mask.shape == plain.init.shape == (128, 128, 3)
    assert plain.mask[64, 0].tolist() == [255] * 3 and plain.mask[64, -1].tolist() == [0] * 3
    assert np.array_equal(inverted.mask, 255 - plain.mask)
    control = plain.controls[0]
    assert np.array_equal(control.image, init) and control.resize_mode == "crop_and_resize"
    assert plain.echo["init_images"] is None and plain.echo["mask"] is None
    echoed = api.prepare(Img2ImgRequest(**base, include_init_images=True))
    assert echoed.echo["init_images"] == base["init_images"]


@pytest.mark.parametrize("resize_mode", [5, -1])
def test_an_unknown_img2img_resize_mode_is_a_4xx(app, shapes_sample, resize_mode):
    """A bad img2img ``resize_mode`` (A1111 has 0-3) is a 4xx naming it (it was once a 500)."""
    body = {"init_images": [b64png(shapes_sample[1]["target"])], "resize_mode": resize_mode, "steps": 1}
    status, _, r = asyncio.run(asgi_json(app, "POST", "/sdapi/v1/img2img", body))
    assert status in (400, 422) and "resize_mode" in r["detail"], (status, r)


# ---------------------------------------------------------------------- interrupt, through the app

def test_interrupt_stops_the_running_generation_after_its_step(app, local, monkeypatch):
    """A 50-step txt2img is held inside step 2 (index 1); progress shows it; /interrupt answers {};
    released, it stops after that step and still answers one image. The next one runs every step."""
    held, release, calls = threading.Event(), threading.Event(), []
    run_pipeline = local.run_pipeline

    def counted(kwargs):
        step = kwargs["callback"]

        def callback(i):
            calls.append(i)
            step(i)
            if kwargs["steps"] == 50 and i == 1:
                held.set()
                assert release.wait(600), "the test never released the model"
        return run_pipeline({**kwargs, "callback": callback})
    monkeypatch.setattr(local, "run_pipeline", counted)

    async def scenario():
        job = asyncio.create_task(asgi_json(app, "POST", "/sdapi/v1/txt2img", {"prompt": "x", "steps": 50, "seed": 1}))
        await wait_until(held.is_set, "the generation reaches step 2")
        progress = await asgi_json(app, "GET", "/sdapi/v1/progress")
        stopped = await asgi_json(app, "POST", "/sdapi/v1/interrupt")
        after = await asgi_json(app, "GET", "/sdapi/v1/progress")
        release.set()
        return await job, progress, stopped, after
    try:
        (status, _, r), (_, _, progress), stopped, (_, _, after) = asyncio.run(scenario())
    finally:
        release.set()
    state = progress["state"]
    assert (state["job_count"], state["sampling_step"], state["sampling_steps"]) == (1, 2, 50)
    assert progress["progress"] == 0.04 and not state["interrupted"] and after["state"]["interrupted"]
    assert stopped[0] == 200 and stopped[2] == {}
    assert status == 200 and len(r["images"]) == 1, r
    assert calls == [0, 1]
    calls.clear()
    status, _, r = asyncio.run(asgi_json(app, "POST", "/sdapi/v1/txt2img", {"prompt": "x", "steps": 3, "seed": 1}))
    assert status == 200 and len(r["images"]) == 1 and calls == [0, 1, 2]
    assert json.loads(r["info"])["steps"] == 3


# ---------------------------------------------------------------------- --api-auth

def basic(user_pass: str) -> str:
    return "Basic " + base64.b64encode(user_pass.encode()).decode()


@pytest.mark.parametrize("path", ["/sdapi/v1/options", "/api/models", "/", "/controlnet/version"])
def test_basic_auth_on_every_route(local, path):
    app = http.create_app(dataclasses.replace(CONFIG, api_auth="alice:secret,bob:pw"), server=local)
    for header in (None, basic("alice:wrong"), basic("carol:secret"), basic("alice:pw"),
                   "Bearer " + basic("alice:secret").split()[1], "Basic %%%not-base64"):
        status, headers, body = asyncio.run(asgi_call(app, "GET", path, headers={"Authorization": header}
                                                      if header else None))
        assert status == 401 and headers["www-authenticate"].startswith("Basic"), (header, status)
        assert set(json.loads(body)) == {"error", "detail"}
    for user in ("alice:secret", "bob:pw"):
        assert asyncio.run(asgi_call(app, "GET", path, headers={"Authorization": basic(user)}))[0] == 200


def test_credentials_and_exposure():
    assert credentials("alice:secret, bob:p:w") == [("alice", "secret"), ("bob", "p:w")]
    for spec in ("a", "a:", ":b", "a:b,"):
        with pytest.raises(ValueError, match="--api-auth"):
            credentials(spec)
    with pytest.raises(ValueError, match="--api-auth"):
        check_exposure(ServeConfig(host="0.0.0.0"))
    check_exposure(ServeConfig(host="0.0.0.0", api_auth="alice:secret"))
    check_exposure(ServeConfig(host="127.0.0.1"))
    with pytest.raises(ValueError, match="--api-auth"):  # malformed, even on loopback
        check_exposure(ServeConfig(host="127.0.0.1", api_auth="alice"))


def test_cli_refuses_an_open_host_before_loading_models():
    env = {k: v for k, v in os.environ.items() if k != "CTRLNET_API_AUTH"}
    out = subprocess.run([sys.executable, "-m", "ctrlnet.cli", "serve", "--host", "0.0.0.0", "--port", "0"],
                         capture_output=True, text=True, env=env, timeout=600)
    lines = out.stderr.strip().splitlines()
    assert out.returncode != 0 and len(lines) == 1, out.stderr
    assert lines[0].startswith("ctrlnet serve: error: --host 0.0.0.0") and "--api-auth" in lines[0]
    assert "http://" not in out.stderr  # the line printed once the models are loaded


# ---------------------------------------------------------------------- error bodies and routes

def test_error_bodies_are_a1111_shaped_on_its_routes_only(app):
    status, _, r = asyncio.run(asgi_json(app, "POST", "/sdapi/v1/txt2img", {"prompt": "x", "steps": 500}))
    assert status == 400 and set(r) == {"error", "detail", "body", "errors"} and "steps" in r["detail"], r
    status, _, r = asyncio.run(asgi_json(app, "POST", "/controlnet/detect", {"controlnet_module": "hed"}))
    assert status == 422 and set(r) == {"error", "detail", "body", "errors"} and "'hed'" in r["detail"], r
    status, _, r = asyncio.run(asgi_json(app, "POST", "/api/generate", {"prompt": "x", "steps": 500}))
    assert status == 400 and set(r) == {"error"} and "steps" in r["error"], r


def test_options_trailing_slash_and_checkpoint(app, local):
    status, headers, _ = asyncio.run(asgi_call(app, "POST", "/sdapi/v1/options/", b'{"x": 1}',
                                               {"Content-Type": "application/json"}))
    assert status == 307 and headers["location"].endswith("/sdapi/v1/options")
    status, _, r = asyncio.run(asgi_json(app, "POST", "/sdapi/v1/options", {"samples_save": False}))
    assert status == 200 and r is None
    status, _, r = asyncio.run(asgi_json(app, "GET", "/sdapi/v1/options"))
    assert r["samples_save"] is False and r["sd_model_checkpoint"].startswith("nano [")
    status, _, r = asyncio.run(asgi_json(app, "POST", "/sdapi/v1/options", {"sd_model_checkpoint": "sdxl"}))
    assert status == 400 and "sd_model_checkpoint" in r["detail"]


# ---------------------------------------------------------------------- /controlnet lists

def with_query(app):
    """The app, reading a "?query" left in the path (servekit's scope has no query string)."""
    async def call(scope, receive, send):
        path, _, query = scope["path"].partition("?")
        await app({**scope, "path": path, "raw_path": path.encode(), "query_string": query.encode()}, receive, send)
    return call


def test_module_list(app, local):
    """Only the modules this server can run: the tests hide detector weights, so the neural ones
    (depth, hed, ...) are left out, under either naming."""
    _, _, names = asyncio.run(asgi_json(with_query(app), "GET", "/controlnet/module_list?alias_names=false"))
    _, _, labels = asyncio.run(asgi_json(with_query(app), "GET", "/controlnet/module_list?alias_names=true"))
    for r in (names, labels):
        assert {"none", "canny"} <= set(r["module_list"]) and set(r["module_detail"]) == set(r["module_list"])
        assert r["module_detail"]["canny"]["sliders"] == [
            {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8},
            {"name": "Low Threshold", "value": 100, "min": 1, "max": 255, "step": 1},
            {"name": "High Threshold", "value": 200, "min": 1, "max": 255, "step": 1}]
        for hidden in ("depth", "depth_midas", "hed", "softedge_hed", "mlsd", "lineart", "lineart_realistic"):
            assert hidden not in r["module_list"]
    assert "invert" in names["module_list"] and "invert (from white bg & black line)" in labels["module_list"]
    assert len(names["module_list"]) == len(labels["module_list"])
    for label, m in ext.all_modules().items():  # listed exactly when its annotator can run here
        runnable = m.annotator in ("", "inpaint") or not local.unavailable(m.annotator)
        assert (label in labels["module_list"]) == runnable, label


def test_settings_and_control_types(app, local):
    _, _, settings = asyncio.run(asgi_json(app, "GET", "/controlnet/settings"))
    n = CONFIG.max_controls
    assert settings == {"control_net_unit_count": n, "control_net_max_models_num": n}
    _, _, r = asyncio.run(asgi_json(app, "GET", "/controlnet/control_types"))
    title = f"nano-canny [{ext.model_hash(local.sources['nano-canny'])}]"
    types = r["control_types"]
    assert types["All"]["default_option"] == "none" and title in types["All"]["model_list"]
    assert types["Canny"]["default_option"] == "canny" and title in types["Canny"]["model_list"]
    assert types["Canny"]["default_model"] == title
    _, _, models = asyncio.run(asgi_json(app, "GET", "/controlnet/model_list"))
    assert title in models["model_list"]


# ---------------------------------------------------------------------- what the review found (each once a bug)

def png_b64(im) -> str:
    import io

    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_masks_are_read_as_a1111_reads_them(api):
    """A varying alpha channel is the mask (opaque = repaint), whatever the colours; otherwise the
    greyscale of the colours (pure red 200 is grey 60: keep), not their brightest channel."""
    from PIL import Image
    rgba = np.zeros((64, 64, 4), np.uint8)  # black everywhere, opaque only in a square
    rgba[16:48, 16:48, 3] = 255
    m = api.mask(png_b64(Image.fromarray(rgba, "RGBA")), "mask")
    assert m.shape == (64, 64, 3) and (m[16:48, 16:48] == 255).all() and m.sum() == 255 * 3 * 32 * 32
    red = np.zeros((64, 64, 3), np.uint8)
    red[:, :32] = (200, 0, 0)
    red[:, 32:] = 255
    m = api.mask(png_b64(Image.fromarray(red)), "mask")
    assert m[0, 0, 0] < 128 and m[0, 40, 0] == 255


@pytest.mark.parametrize("v", [float("inf"), float("-inf"), float("nan"), 1.5])
def test_modes_refuse_non_whole_numbers_naming_where(v):
    for fn in (ext.resize_mode, ext.control_mode):
        with pytest.raises(ValueError, match="here"):
            fn(v, "here")


def test_options_keep_scalars_only_and_a_bounded_number(app, local):
    nested = {"k": [[[[1]]]]}
    status, _, r = asyncio.run(asgi_json(app, "POST", "/sdapi/v1/options", nested))
    assert status == 400 and "options.k" in r["detail"]
    status, _, r = asyncio.run(asgi_json(app, "POST", "/sdapi/v1/options", {f"o{i}": i for i in range(300)}))
    assert status == 400 and "at most" in r["detail"]
    status, _, r = asyncio.run(asgi_json(app, "GET", "/sdapi/v1/options"))
    assert status == 200 and "k" not in r and "o0" not in r


def test_deeply_nested_fields_are_refused_before_the_work(api):
    deep = 0
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(ApiError) as e:
        api.prepare(Txt2ImgRequest(prompt="x", steps=1, override_settings={"k": deep}))
    assert e.value.status == 400 and "nested" in e.value.message


@pytest.mark.parametrize("sampler, img2img", [("PLMS", False), ("DDIM", True), ("Euler a", True)])
def test_progress_counts_the_steps_the_sampler_runs(api, shapes_sample, sampler, img2img):
    """img2img runs strength x steps, PLMS one step more: the progress goes to exactly its total."""
    _, maps = shapes_sample
    fields = {"prompt": "x", "steps": 6, "n_iter": 2, "sampler_name": sampler, "width": 128, "height": 128}
    req = Img2ImgRequest(**fields, init_images=[b64png(maps["target"])], denoising_strength=0.5) if img2img \
        else Txt2ImgRequest(**fields)
    job = api.prepare(req)
    seen = []
    api.run(job, on_step=seen.append)
    assert seen == list(range(job.calls * job.n_iter))
    assert job.calls == (3 if img2img else 7)


def test_units_flags_canny_order_and_the_last_script_key():
    assert ext.units([cn(enabled=None)], TITLES)  # null = the default (enabled)
    assert ext.units([cn(enabled="false"), cn(enabled=0)], TITLES) == []
    with pytest.raises(ValueError, match=r"\[0\]\.enabled"):
        ext.units([cn(enabled="maybe")], TITLES)
    u = unit(cn(threshold_a=200, threshold_b=100))  # OpenCV takes them in either order: so do we
    assert (u.params["low"], u.params["high"]) == (100, 200)
    assert unit(cn(pixel_perfect="true")).params == {"low": 100, "high": 200}


def test_the_last_controlnet_entry_with_units_wins(api):
    units = api.units({"controlnet": {"args": [cn(), cn()]}, "ControlNet": {"args": [cn(weight=0.5)]},
                       "CONTROLNET": {"args": []}})
    assert [u.scale for u in units] == [0.5]


def test_sampler_names_in_any_case():
    assert A1111.sampler("dpm++ 2m", None) == ("DPM++ 2M", "dpmpp_2m_karras")
    assert A1111.sampler("euler A", "Automatic") == ("Euler a", "euler_a")
    assert A1111.sampler("dpm++ 2m karras", None) == ("DPM++ 2M", "dpmpp_2m_karras")


def test_processor_res_is_lowered_to_fit_the_caps(api):
    """webuiapi's default processor_res 512 on a 3:1 photo would make a 1536 px map, over
    max_side 1024: lowered in steps of 64 until the map fits."""
    from ctrlnet.annotators import resolution_size
    params = api.fit_resolution(np.zeros((128, 384, 3), np.uint8), {"low": 1, "detect_resolution": 512})
    sh, sw = resolution_size(128, 384, params["detect_resolution"], "t", "detect_resolution")
    assert params["detect_resolution"] < 512 and max(sh, sw) <= CONFIG.max_side
    assert api.fit_resolution(np.zeros((128, 128, 3), np.uint8), {"detect_resolution": 512}) == \
        {"detect_resolution": 512}


def test_loopback_is_an_address_not_a_prefix():
    from ctrlnet.serve.config import is_loopback
    assert is_loopback("127.0.0.1") and is_loopback("127.1.2.3") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("127.example.com") and not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")


def test_an_interrupt_stops_a_json_api_generation_too(local, shapes_sample):
    """/sdapi/v1/interrupt stops whatever runs, /api/generate's too; the flag ends with the run."""
    from ctrlnet.serve.schemas import GenerateRequest
    q, seen = local.generation, []
    req = GenerateRequest(prompt="x", steps=20, width=128, height=128)

    def on_step(i):
        seen.append(i)
        if i == 2:
            q.interrupt()
    q.enter()
    with q.run(20):
        local.generate(req, [], on_step, q.interrupted)
    assert seen == [0, 1, 2] and not q.interrupted()

"""The server's parts called directly, in this process: the queue, the Server's checks, the request
-> Control conversion, the route handlers with a starlette Request, and the whole ASGI app driven
without sockets (servekit.asgi_call). No subprocess, no uvicorn, no clock: where a test needs the
model busy, an Event holds it."""

import asyncio
import base64
import json
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from servekit import (Hangup, asgi_call, asgi_json, b64png, decode_data_url, make_request, png, sideways_jpeg,
                      wait_until)

pytest.importorskip("fastapi")

from ctrlnet.pipeline import Control  # noqa: E402
from ctrlnet.serve import ServeConfig  # noqa: E402
from ctrlnet.serve import app as http  # noqa: E402
from ctrlnet.serve.queue import GenerationQueue, QueueFull  # noqa: E402
from ctrlnet.serve.schemas import ControlUnitRequest, DetectRequest, GenerateRequest  # noqa: E402
from ctrlnet.serve.server import ApiError, Server  # noqa: E402

# the limits of the subprocess server in conftest.py
CONFIG = ServeConfig(queue=1, max_upload_mb=1, max_pixels=1_000_000, max_steps=50, max_images=2)


@pytest.fixture(scope="module")
def local():
    """One Server (nano + the bundled nets) for this module."""
    return Server(CONFIG)


@pytest.fixture(scope="module")
def app(local):
    return http.create_app(CONFIG, server=local)


# ---------------------------------------------------------------------- the queue

def test_queue_admits_the_running_one_plus_limit_then_refuses():
    q = GenerationQueue(1)
    q.enter()
    q.enter()
    with pytest.raises(QueueFull) as e:
        q.enter()
    assert e.value.retry_after >= 1 and "busy" in str(e.value)
    q.leave()  # a request that failed before running gives its place back
    q.enter()
    q.leave()
    q.leave()
    assert q.status()["queued"] == 0 and q.waiting == 0


def test_queue_runs_one_at_a_time_and_frees_places_after():
    q = GenerationQueue(1)
    holding, release, order = threading.Event(), threading.Event(), []

    def first():
        with q.run(3):
            holding.set()
            release.wait()
            order.append("first")

    def second():
        with q.run(5):
            order.append("second")
    q.enter()
    a = threading.Thread(target=first)
    a.start()
    assert holding.wait(60)
    q.enter()
    b = threading.Thread(target=second)
    b.start()  # blocks on the model until `first` ends
    status = q.status()
    assert status["running"] and status["total"] == 3 and status["queued"] == 1
    with pytest.raises(QueueFull):
        q.enter()
    release.set()
    a.join()
    b.join()
    assert order == ["first", "second"]
    assert q.status() == {"running": False, "step": 0, "total": 5, "queued": 0, "limit": 1, "done": 2, "dropped": 0}
    q.enter()  # room again
    q.leave()


# ---------------------------------------------------------------------- Server: checks and conversion

@pytest.mark.parametrize("fields, words", [
    ({"steps": 500}, ["steps: 500 is over this server's limit of 50"]),
    ({"num_images": 3}, ["num_images: 3"]),
    ({"height": 4096}, ["height: 4096"]),
    ({"scheduler": "magic"}, ["scheduler", "unknown scheduler 'magic'", "ddim"]),
    ({"controls": [{"model": "../nano-sd"}]}, ["controls.0.model", "unknown ControlNet", "nano-canny"]),
    ({"controls": [{"model": "nano-canny"}] * 5}, ["controls: 5 units"]),
    ({"controls": [{"model": "nano-canny", "annotator": "inpaint"}]}, ["controls.0.annotator", "inpaint"]),
    ({"controls": [{"model": "nano-canny", "annotator": "canny", "params": {"detect_resolution": 5000}}]},
     ["controls.0", "detect_resolution=5000 is not an integer in [64, 2048]"]),
    ({"controls": [{"model": "nano-canny", "annotator": "canny", "params": {"detect_resolution": 2048}}]},
     ["controls.0.params.detect_resolution: must be an integer in [64, 1024]"]),  # this server's max_side
    ({"controls": [{"model": "nano-canny", "annotator": "seg_colour_clusters", "params": {"k": 1e9}}]},
     ["controls.0", "annotator 'seg_colour_clusters': k=1000000000.0 is not an integer in [1, 16]"]),
    ({"controls": [{"model": "nano-canny", "params": {"low": 5}}]}, ["controls.0", "parameters", "no annotator"]),
])
def test_check_generate_refuses(local, fields, words):
    with pytest.raises(ApiError) as e:
        local.check_generate(GenerateRequest(prompt="x", **fields))
    assert e.value.status == 400 and all(w in e.value.message for w in words), e.value.message


def test_check_generate_takes_scheduler_spellings_the_pipeline_takes(local):
    for name in ("ddim", "DPM++ 2M Karras", "euler-a"):
        local.check_generate(GenerateRequest(prompt="x", scheduler=name))


def test_a_unit_becomes_a_control():
    unit = ControlUnitRequest(model="nano-canny", annotator="canny", params={"low": 50}, scale=[0.5, 1.0],
                              start=0.1, end=0.9, mode="prompt", resize_mode="just_resize")
    image = np.zeros((8, 8, 3), np.uint8)
    control = unit.to_control(image)
    assert control == Control(model="nano-canny", image=image, annotator="canny", annotator_params={"low": 50},
                              scale=[0.5, 1.0], start=0.1, end=0.9, mode="prompt", resize_mode="just_resize")
    assert control.annotator_params is not unit.params  # the request's dict is not shared


@pytest.mark.parametrize("unit, words", [
    ({"model": "nano-canny", "start": 0.8, "end": 0.2}, ["controls.1", "start <= end"]),
    ({"model": "nano-canny", "annotator": "nope"}, ["controls.1", "unknown annotator 'nope'"]),
    ({"model": "nano-canny", "annotator": "canny", "params": {"lo": 1}}, ["controls.1", "unknown parameter", "lo"]),
])
def test_controls_are_checked_by_control_check(local, unit, words):
    req = GenerateRequest(prompt="x", controls=[{"model": "nano-canny"}, unit])
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ApiError) as e:
        local.controls(req, [image, image])
    assert e.value.status == 400 and all(w in e.value.message for w in words), e.value.message


def test_models_uses_the_pipelines_defaults(local):
    m = local.models()
    guidance, rescale = local.pipe.default_guidance()
    assert (m["defaults"]["guidance"], m["defaults"]["guidance_rescale"]) == (guidance, rescale) == (2.5, 0.7)
    assert m["limits"]["queue"] == 1 and m["limits"]["max_steps"] == 50
    assert [c["name"] for c in m["controlnets"]] == ["nano-canny", "nano-segmentation"]  # the bundled nets


# ---------------------------------------------------------------------- handlers, called directly

def test_detect_handler(app, shapes_sample):
    from ctrlnet.annotators import get_annotator
    _, maps = shapes_sample
    body = json.dumps({"image": b64png(maps["target"]), "annotator": "canny"}).encode()
    r = asyncio.run(http.detect(make_request(app, body, {"Content-Type": "application/json"})))
    got = np.asarray(decode_data_url(r["image"]).convert("RGB"))
    assert np.array_equal(got, get_annotator("canny")(maps["target"]))


def test_generate_handler_refuses_before_queueing(app, local):
    body = json.dumps({"prompt": "x", "steps": 2, "controls": [{"model": "nano-canny"}]}).encode()
    with pytest.raises(ApiError) as e:
        asyncio.run(http.generate(make_request(app, body, {"Content-Type": "application/json"})))
    assert e.value.status == 400 and "controls.0.image: no image" in e.value.message
    assert local.generation.waiting == 0


def test_read_request_multipart(app, shapes_sample):
    _, maps = shapes_sample
    boundary = "b0undary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="annotator"\r\n\r\ncanny\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="params"\r\n\r\n{{"low": 7}}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
            f"Content-Type: image/png\r\n\r\n").encode() + png(maps["target"]) + f"\r\n--{boundary}--\r\n".encode()
    request = make_request(app, body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    req, uploads = asyncio.run(http.read_request(request, DetectRequest))
    assert req == DetectRequest(annotator="canny", params={"low": 7}) and set(uploads) == {"image"}
    assert np.array_equal(http.image_of(None, uploads["image"], "image", 10 ** 6), maps["target"])


@pytest.mark.parametrize("body, ctype, status, words", [
    (b"{not json", "application/json", 400, ["not valid JSON"]),
    (b"[1]", "application/json", 400, ["must be a JSON object"]),
    (b"x", "text/plain", 415, ["text/plain"]),
    (b'{"prompt": "x", "controls": [{"model": "m", "mode": "loud"}]}', "application/json", 422,
     ["GenerateRequest", "controls.0.mode"]),
])
def test_read_request_refuses(app, body, ctype, status, words):
    with pytest.raises(ApiError) as e:
        asyncio.run(http.read_request(make_request(app, body, {"Content-Type": ctype}), GenerateRequest))
    assert e.value.status == status and all(w in e.value.message for w in words), e.value.message


def test_image_of_refuses():
    with pytest.raises(ApiError) as e:
        http.image_of(b64png(np.zeros((2000, 600, 3), np.uint8)), None, "controls.0.image", 10 ** 6)
    assert e.value.status == 413 and "controls.0.image" in e.value.message
    with pytest.raises(ApiError) as e:
        http.image_of("%%%", None, "image", 10 ** 6)
    assert e.value.status == 400 and "not valid base64" in e.value.message


def test_error_handlers(app):
    request = make_request(app)
    r = asyncio.run(http.on_api_error(request, ApiError(503, "busy", {"Retry-After": "3"})))
    assert r.status_code == 503 and r.headers["retry-after"] == "3" and json.loads(r.body) == {"error": "busy"}
    try:
        raise RuntimeError("boom in /work/secret/module.py")
    except RuntimeError as e:  # on_error prints the traceback being handled
        r = asyncio.run(http.on_error(request, e))
    assert r.status_code == 500 and json.loads(r.body) == {
        "error": "internal error (RuntimeError); the server's log has the details"}


# ---------------------------------------------------------------------- the ASGI app, no sockets

def test_app_routes_and_errors(app):
    status, _, health = asyncio.run(asgi_json(app, "GET", "/api/health"))
    assert status == 200 and health["ok"] is True
    status, _, r = asyncio.run(asgi_json(app, "GET", "/api/nowhere"))
    assert status == 404 and r == {"error": "Not Found"}
    status, _, r = asyncio.run(asgi_json(app, "POST", "/api/generate", {"prompt": "x", "steps": 500}))
    assert status == 400 and "steps: 500" in r["error"]
    too_big = {"image": "x" * (2 * 2 ** 20), "annotator": "canny"}
    status, _, r = asyncio.run(asgi_json(app, "POST", "/api/detect", too_big))
    assert status == 413 and "limit of 1 MB" in r["error"]
    status, headers, page = asyncio.run(asgi_call(app, "GET", "/"))
    assert status == 200 and headers["content-type"].startswith("text/html") and b"<html" in page.lower()


def test_a_full_queue_answers_503_at_once(app, local, shapes_sample, monkeypatch):
    """Queue 1: the first request runs and is held (an Event, not a duration), the second waits
    for the model; only then do the next arrive, and each is refused at once with Retry-After.
    Released, the two admitted ones finish and the queue is empty again."""
    _, maps = shapes_sample
    running, release = threading.Event(), threading.Event()
    generate = local.generate

    def held(req, controls, on_step=None, stop=None):
        running.set()
        assert release.wait(600), "the test never released the model"
        return generate(req, controls, on_step, stop)
    monkeypatch.setattr(local, "generate", held)
    payload = {"prompt": "a blue square", "steps": 2,
               "controls": [{"model": "nano-canny", "image": b64png(maps["canny"])}]}

    async def burst():
        first = asyncio.create_task(asgi_json(app, "POST", "/api/generate", payload))
        await wait_until(running.is_set, "the first request runs")
        second = asyncio.create_task(asgi_json(app, "POST", "/api/generate", payload))
        await wait_until(lambda: local.generation.status()["queued"] == 1, "the second request waits")
        refused = [await asgi_json(app, "POST", "/api/generate", payload) for _ in range(4)]
        progress = await asgi_json(app, "GET", "/api/progress")
        release.set()
        return await asyncio.gather(first, second), refused, progress
    try:
        admitted, refused, progress = asyncio.run(burst())
    finally:
        release.set()
    assert progress[2]["running"] and progress[2]["queued"] == 1
    for status, headers, r in refused:
        assert status == 503 and "busy" in r["error"] and int(headers["retry-after"]) >= 1
    for status, _, r in admitted:
        assert status == 200 and len(r["images"]) == 1, r
    assert local.generation.status()["queued"] == 0 and local.generation.waiting == 0
    assert not local.generation.status()["running"]


def test_openapi_names_the_request_schemas(app):
    status, _, schema = asyncio.run(asgi_json(app, "GET", "/openapi.json"))
    assert status == 200
    components = schema["components"]["schemas"]
    assert {"GenerateRequest", "ControlUnitRequest", "DetectRequest", "GenerateResponse", "DetectResponse"} <= \
        set(components)
    assert "ControlUnit" not in components  # ctrlnet.models.ControlUnit is another thing
    assert components["ControlUnitRequest"]["properties"]["mode"]["enum"] == ["balanced", "prompt", "control"]


def test_import_and_the_extra_message_need_no_fastapi():
    """`import ctrlnet.serve`, ServeConfig and serve's message about the extra, with fastapi,
    starlette and uvicorn unimportable."""
    code = ("import sys\n"
            "for m in ('fastapi', 'starlette', 'uvicorn'): sys.modules[m] = None\n"
            "import ctrlnet.serve\n"
            "from ctrlnet.serve import ServeConfig, serve\n"
            "try:\n    serve(ServeConfig())\nexcept ValueError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "needs the serve extra (fastapi is missing)" in out.stdout


# ---------------------------------------------------------------------- bad requests are 4xx, never 500

def deep(n: int) -> str:
    return "[" * n + "]" * n


@pytest.mark.parametrize("body, ctype", [
    (deep(100_000), "application/json"),
    ('{"prompt": "x", "controls": ' + deep(100_000) + "}", "application/json"),
])
def test_deeply_nested_json_is_a_400(app, body, ctype):
    """Python's JSON parser recurses: 100000 nested lists (200 kB) were a RecursionError and a 500."""
    status, _, r = asyncio.run(asgi_call(app, "POST", "/api/generate", body.encode(), {"Content-Type": ctype}))
    assert status == 400 and "nested too deeply" in json.loads(r)["error"], r
    boundary = "b0undary"
    form = (f'--{boundary}\r\nContent-Disposition: form-data; name="request"\r\n\r\n{deep(100_000)}\r\n'
            f"--{boundary}--\r\n").encode()
    with pytest.raises(ApiError) as e:
        asyncio.run(http.read_request(make_request(
            app, form, {"Content-Type": f"multipart/form-data; boundary={boundary}"}), GenerateRequest))
    assert e.value.status == 400 and "form field 'request': JSON nested too deeply" in e.value.message


def test_a_500_shows_no_paths_or_traceback(app, local, monkeypatch, capsys):
    """A true internal error: the client learns that it happened, the log gets the details."""
    def broken():
        raise RuntimeError("/work/main/.venv/lib/python3.11/site-packages/x.py: something broke")
    monkeypatch.setattr(local, "models", broken)
    status, _, body = asyncio.run(asgi_call(app, "GET", "/api/models"))
    assert status == 500 and json.loads(body) == {
        "error": "internal error (RuntimeError); the server's log has the details"}
    for leak in (b"/work", b"site-packages", b"Traceback", b".py"):
        assert leak not in body
    assert "Traceback" in capsys.readouterr().err  # logged on the server


@pytest.mark.parametrize("fields, status, words", [
    # Python's json reads NaN / Infinity, which JSON itself does not have
    ('"guidance": NaN', 422, ["guidance", "finite number"]),
    ('"guidance": Infinity', 422, ["guidance", "finite number"]),
    ('"guidance": 1e999', 422, ["guidance", "finite number"]),
    ('"guidance": 101', 422, ["guidance", "less than or equal to 100", "got 101"]),
    ('"guidance_rescale": 1.5', 422, ["guidance_rescale"]),
    ('"steps": 0', 422, ["steps", "got 0"]),
    ('"width": 0', 422, ["width", "greater than or equal to 1"]),
    ('"seed": -2', 422, ["seed", "got -2"]),
    ('"seed": 4294967296', 422, ["seed"]),
    ('"seed": 4294967295, "num_images": 2', 400, ["seed: 4294967295 with 2 images runs past 4294967295"]),
    ('"controls": [{"model": "nano-canny", "image": "IMG", "scale": NaN}]', 422,
     ["controls.0.scale", "finite number"]),
    ('"controls": [{"model": "nano-canny", "image": "IMG", "scale": [1, 99]}]', 400,
     ["controls.0", "scale: 99.0 is not a number in [0, 10]"]),
    ('"controls": [{"model": "nano-canny", "image": "IMG", "scale": [1, 2]}]', 400,
     ["controls.0", "conditioning_scale has 2 values"]),
    ('"controls": [{"model": "nano-canny", "image": "IMG", "start": NaN}]', 422, ["controls.0.start"]),
    # get_annotator's check (a string where a number belongs), turned into a 400 before queueing
    ('"controls": [{"model": "nano-canny", "image": "IMG", "annotator": "canny", "params": {"low": "abc"}}]', 400,
     ["controls.0", "low", "abc"]),
    ('"controls": [{"model": "nano-canny", "image": "IMG", "annotator": "canny", "params": {"low": NaN}}]', 422,
     ["controls.0.params.low"]),
])
def test_bad_numbers_are_4xx_naming_the_field(app, shapes_sample, fields, status, words):
    _, maps = shapes_sample
    body = ('{"prompt": "x", "steps": 1, ' + fields + "}").replace("IMG", b64png(maps["canny"]))
    got, _, r = asyncio.run(asgi_call(app, "POST", "/api/generate", body.encode(),
                                      {"Content-Type": "application/json"}))
    error = json.loads(r)["error"]
    assert got == status and all(w in error for w in words), error


# ---------------------------------------------------------------------- sizes stay within the caps

def test_a_size_derived_from_an_extreme_aspect_obeys_the_caps(app, local):
    """No width/height: the size follows the control image's aspect (short side at the native 128).
    A 1x256 PNG (78 bytes) asked for 32768x128; it is scaled down to fit max_side (1024), aspect
    kept as far as the size multiple (32) allows. An explicit size over the caps stays a 400."""
    strip = np.zeros((1, 256, 3), np.uint8)
    strip[:, ::2] = 255
    status, _, r = asyncio.run(asgi_json(app, "POST", "/api/generate", {
        "prompt": "x", "steps": 1, "controls": [{"model": "nano-canny", "image": b64png(strip)}]}))
    assert status == 200, r
    assert (r["width"], r["height"]) == (1024, 32)
    assert r["width"] <= CONFIG.max_side and r["width"] * r["height"] <= CONFIG.max_pixels
    with pytest.raises(ApiError) as e:  # 1024 x 1024 is over the 1,000,000 pixels of CONFIG
        local.sized(GenerateRequest(prompt="x", width=1024, height=1024), [])
    assert e.value.status == 400 and "1024x1024" in e.value.message and "1,000,000 pixels" in e.value.message
    assert local.sized(GenerateRequest(prompt="x", width=100), []).height == 96  # rounded as the Pipeline does


def test_detect_works_on_at_most_the_capped_size(app, shapes_sample):
    """A 16x16384 PNG (262144 pixels, under max_pixels; a few hundred bytes) is scaled down to
    max_side before the annotator runs, so the map is at most 1024 px long; a resolution that
    would make the long side exceed the cap is a 400 before any work."""
    from ctrlnet.annotators import get_annotator
    _, maps = shapes_sample
    tall = np.tile(maps["target"][:, :16], (128, 1, 1))  # (16384, 16, 3)
    status, _, r = asyncio.run(asgi_json(app, "POST", "/api/detect", {"image": b64png(tall), "annotator": "canny"}))
    assert status == 200, r
    assert (r["width"], r["height"]) == (1, 1024)
    small = maps["target"][:64, :]  # 128 x 64
    status, _, r = asyncio.run(asgi_json(app, "POST", "/api/detect", {
        "image": b64png(small), "annotator": "canny", "params": {"image_resolution": 1024}}))
    assert status == 400 and "detect.params.image_resolution: 1024 on a 128x64 image makes a 2048x1024 map" \
        in r["error"], r
    status, _, r = asyncio.run(asgi_json(app, "POST", "/api/detect", {"image": b64png(small), "annotator": "canny"}))
    assert status == 200 and np.array_equal(np.asarray(decode_data_url(r["image"]).convert("RGB")),
                                            get_annotator("canny")(small))  # within the caps: untouched


# ---------------------------------------------------------------------- EXIF orientation, random seeds

def test_a_sideways_jpeg_is_generated_upright(app, shapes_sample):
    """A JPEG stored sideways with EXIF orientation 6: the derived size has the upright (portrait)
    aspect, and the condition map is the upright image."""
    _, maps = shapes_sample
    upright = np.concatenate([maps["segmentation"], maps["segmentation"][::-1]], axis=0)  # (256, 128, 3)
    jpeg, expected = sideways_jpeg(upright)
    status, _, r = asyncio.run(asgi_json(app, "POST", "/api/generate", {
        "prompt": "x", "steps": 1, "controls": [{"model": "nano-segmentation",
                                                  "image": base64.b64encode(jpeg).decode()}]}))
    assert status == 200, r
    assert (r["width"], r["height"]) == (128, 256)
    condition = np.asarray(decode_data_url(r["conditions"][0]).convert("RGB")).astype(int)
    assert condition.shape == (256, 128, 3)
    assert np.abs(condition - expected).max() <= 1  # float round trip
    assert np.abs(condition - upright).mean() < 8  # the JPEG's loss only: the right way up


def test_seed_minus_one_draws_a_seed_and_reports_it(app):
    status, _, r = asyncio.run(asgi_json(app, "POST", "/api/generate", {"prompt": "x", "steps": 1, "seed": -1,
                                                                        "num_images": 2}))
    assert status == 200, r
    first = r["seeds"][0]
    assert 0 <= first and r["seeds"] == [first, first + 1]
    assert f"Seed: {first + 1}," in r["parameters"][1]
    status, _, again = asyncio.run(asgi_json(app, "POST", "/api/generate", {"prompt": "x", "steps": 1,
                                                                            "seed": first, "num_images": 2}))
    assert again["seeds"] == r["seeds"]
    for a, b in zip(again["images"], r["images"]):  # reproducible from the reported seed
        diff = np.asarray(decode_data_url(a).convert("RGB")).astype(int) - np.asarray(decode_data_url(b).convert("RGB"))
        assert np.abs(diff).max() <= 2


# ---------------------------------------------------------------------- a client that leaves

def test_a_queued_request_whose_client_left_is_dropped(app, local, shapes_sample, monkeypatch):
    """Queue 1: the first request runs, held by an Event; the second waits for the model, and its
    client hangs up. When the first is released, the second is dropped without generating."""
    _, maps = shapes_sample
    running, release, ran = threading.Event(), threading.Event(), []
    generate = local.generate

    def held(req, controls, on_step=None, stop=None):
        ran.append(req.prompt)
        if req.prompt == "first":
            running.set()
            assert release.wait(600), "the test never released the model"
        return generate(req, controls, on_step, stop)
    monkeypatch.setattr(local, "generate", held)
    payload = {"steps": 1, "controls": [{"model": "nano-canny", "image": b64png(maps["canny"])}]}
    dropped_before = local.generation.status()["dropped"]

    async def scenario():
        first = asyncio.create_task(asgi_json(app, "POST", "/api/generate", {"prompt": "first", **payload}))
        await wait_until(running.is_set, "the first request runs")
        hangup = Hangup()
        body = json.dumps({"prompt": "second", **payload}).encode()
        second = asyncio.create_task(asgi_call(app, "POST", "/api/generate", body,
                                               {"Content-Type": "application/json"}, hangup=hangup))
        await wait_until(lambda: local.generation.status()["queued"] == 1, "the second request waits")
        hangup.set()
        await wait_until(lambda: hangup.delivered, "the server reads the disconnect")
        release.set()
        return await asyncio.gather(first, second)
    try:
        (status1, _, r1), (status2, _, r2) = asyncio.run(scenario())
    finally:
        release.set()
    assert status1 == 200 and len(r1["images"]) == 1
    assert status2 == 499 and b"dropped" in r2
    assert ran == ["first"]  # the second never reached the model
    status = local.generation.status()
    assert status["dropped"] == dropped_before + 1 and status["queued"] == 0 and local.generation.waiting == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the warning is about fp16 on a CPU")
def test_a_slow_dtype_is_reported_to_the_operator():
    """`ctrlnet serve --dtype fp16` on a CPU: the Pipeline's warning used to be silenced with the
    libraries' chatter; `run` prints Server.load_warnings at start."""
    server = Server(ServeConfig(dtype="fp16"))
    assert len(server.load_warnings) == 1 and "fp16 on a CPU is very slow" in server.load_warnings[0]

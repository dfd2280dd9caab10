"""The server's parts called directly, in this process: the queue, the Server's checks, the request
-> Control conversion, the route handlers with a starlette Request, and the whole ASGI app driven
without sockets (servekit.asgi_call). No subprocess, no uvicorn, no clock: where a test needs the
model busy, an Event holds it."""

import asyncio
import json
import subprocess
import sys
import threading

import numpy as np
import pytest

from servekit import asgi_call, asgi_json, b64png, decode_data_url, make_request, png

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


def wait_until(condition, what: str):
    """Await ``condition()`` (a state the test caused, not a duration): yields to the event loop;
    the limit only turns a bug into a failure instead of a hang."""
    async def poll():
        for _ in range(100_000):
            if condition():
                return
            await asyncio.sleep(0.001)
        pytest.fail(f"never happened: {what}")
    return poll()


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
    assert q.status() == {"running": False, "step": 0, "total": 5, "queued": 0, "limit": 1, "done": 2}
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
    ({"controls": [{"model": "nano-canny", "params": {"detect_resolution": 5000}}]},
     ["controls.0.params.detect_resolution"]),
    ({"controls": [{"model": "nano-canny", "params": {"k": 1e9}}]}, ["controls.0.params.k", "out of range"]),
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
        raise RuntimeError("boom")
    except RuntimeError as e:  # on_error prints the traceback being handled
        r = asyncio.run(http.on_error(request, e))
    assert r.status_code == 500 and json.loads(r.body) == {"error": "internal error: RuntimeError: boom"}


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

    def held(req, controls, on_step=None):
        running.set()
        assert release.wait(600), "the test never released the model"
        return generate(req, controls, on_step)
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

"""The HTTP API of `ctrlnet serve`, over real sockets against a running server (nano models)."""

import json
import threading

import numpy as np
import pytest

from servekit import b64png, decode_data_url, png


def test_models_annotators_and_schema(server):
    status, models = server.get("/api/models")
    assert status == 200
    names = [c["name"] for c in models["controlnets"]]
    assert "nano-canny" in names and "nano-segmentation" in names
    assert {c["name"]: c["annotator"] for c in models["controlnets"]}["nano-canny"] == "canny"
    assert "ddim" in models["schedulers"] and models["modes"] == ["balanced", "prompt", "control"]
    status, annotators = server.get("/api/annotators")
    canny = next(a for a in annotators if a["name"] == "canny")
    assert canny["params"] == {"low": 100, "high": 200}
    status, schema = server.get("/openapi.json")
    assert status == 200 and {"/api/detect", "/api/generate", "/api/models"} <= set(schema["paths"])
    body = schema["paths"]["/api/generate"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(body)
    assert "controls" in schema["components"]["schemas"]["GenerateRequest"]["properties"]
    # the unit's component is ControlUnitRequest (not ControlUnit: that is ctrlnet.models' class)
    assert schema["components"]["schemas"]["GenerateRequest"]["properties"]["controls"]["items"] == \
        {"$ref": "#/components/schemas/ControlUnitRequest"}


def test_detect_matches_the_annotator(server, shapes_sample):
    from ctrlnet.annotators import get_annotator
    _, maps = shapes_sample
    status, r, _ = server.post("/api/detect", {"image": b64png(maps["target"]), "annotator": "canny",
                                               "params": {"low": 50, "high": 150}})
    assert status == 200, r
    got = np.asarray(decode_data_url(r["image"]).convert("RGB"))
    assert np.array_equal(got, get_annotator("canny", low=50, high=150)(maps["target"]))
    # ShapesWorld's own canny map uses 100/200 on the same target: the API gives exactly that
    status, r, _ = server.post("/api/detect", {"image": "data:image/png;base64," + b64png(maps["target"]),
                                               "annotator": "canny"})
    assert np.array_equal(np.asarray(decode_data_url(r["image"]).convert("RGB")), maps["canny"])
    # multipart: the same map
    status, r2 = server.multipart("/api/detect", {"annotator": "canny"}, {"image": png(maps["target"])})
    assert status == 200 and r2["image"] == r["image"]


def test_generate_equals_the_python_pipeline(server, shapes_sample):
    from ctrlnet import Control, Pipeline
    sample, maps = shapes_sample
    payload = {"prompt": sample.prompt, "steps": 4, "seed": 7, "num_images": 2,
               "controls": [{"model": "nano-canny", "image": b64png(maps["target"]), "annotator": "canny",
                             "scale": 1.0}]}
    status, r, _ = server.post("/api/generate", payload)
    assert status == 200, r
    assert len(r["images"]) == 2 and r["seeds"] == [7, 8] and (r["width"], r["height"]) == (128, 128)
    first = decode_data_url(r["images"][0])
    assert first.text["parameters"].startswith(sample.prompt) and "Seed: 7" in first.text["parameters"]
    assert np.array_equal(np.asarray(decode_data_url(r["conditions"][0]).convert("RGB")), maps["canny"])
    pipe = Pipeline.from_pretrained("nano", controlnets=["nano-canny"])
    ref = pipe(sample.prompt, controls=[Control("nano-canny", maps["target"], annotator="canny")], steps=4, seed=7,
               num_images=2)
    for url, want in zip(r["images"], ref.images):
        diff = np.abs(np.asarray(decode_data_url(url).convert("RGB")).astype(int) - np.asarray(want).astype(int))
        assert diff.max() <= 2  # same computation; threads may round differently


def test_a_long_prompt_comes_back_as_a_warning(server):
    """The Pipeline warns on the model thread; the response still carries the note."""
    status, r, _ = server.post("/api/generate", {"prompt": " ".join(["red circle"] * 60), "steps": 1})
    assert status == 200, r
    assert len(r["warnings"]) == 1 and "the rest is cut" in r["warnings"][0]


def test_generate_multipart(server, shapes_sample):
    sample, maps = shapes_sample
    request = {"prompt": sample.prompt, "steps": 2, "controls": [{"model": "nano-segmentation"}]}
    status, r = server.multipart("/api/generate", {"request": json.dumps(request)},
                                 {"image0": png(maps["segmentation"])})
    assert status == 200, r
    assert np.array_equal(np.asarray(decode_data_url(r["conditions"][0]).convert("RGB")), maps["segmentation"])


@pytest.mark.parametrize("payload, status, words", [
    ({"image": "x", "annotator": "canny"}, 400, ["not valid base64"]),
    ({"annotator": "canny"}, 400, ["image", "no image"]),
    ({"image": "aGVsbG8=", "annotator": "canny"}, 400, ["cannot decode"]),
    ({"image": "IMG", "annotator": "nope"}, 400, ["unknown annotator 'nope'"]),
    ({"image": "IMG", "annotator": "canny", "params": {"lo": 1}}, 400, ["unknown parameter", "lo"]),
    ({"image": "IMG", "annotator": "canny", "params": {"detect_resolution": 100000}}, 400, ["detect_resolution"]),
    ({"image": "IMG", "annotator": "seg_colour_clusters", "params": {"k": 100000}}, 400, ["annotator 'seg_colour_clusters': k=100000 is not an integer in [1, 16]"]),
    ({"image": "IMG", "annotator": "canny", "path": "/etc/passwd"}, 422, ["path", "Extra inputs"]),
])
def test_detect_errors(server, shapes_sample, payload, status, words):
    _, maps = shapes_sample
    payload = {k: (b64png(maps["target"]) if v == "IMG" else v) for k, v in payload.items()}
    got, r, _ = server.post("/api/detect", payload)
    assert got == status and all(w in r["error"] for w in words), r


@pytest.mark.parametrize("change, status, words", [
    ({"steps": 500}, 400, ["steps", "limit of 50"]),
    ({"num_images": 3}, 400, ["num_images"]),
    ({"width": 4096}, 400, ["width"]),
    ({"scheduler": "magic"}, 400, ["scheduler", "unknown scheduler 'magic'"]),
    ({"controls": [{"model": "/etc/passwd", "image": "IMG"}]}, 400, ["unknown ControlNet '/etc/passwd'"]),
    ({"controls": [{"model": "../nano-sd", "image": "IMG"}]}, 400, ["unknown ControlNet"]),
    # Control.check()'s rule, reported under the unit's field
    ({"controls": [{"model": "nano-canny", "image": "IMG", "start": 0.8, "end": 0.2}]}, 400,
     ["controls.0", "start <= end"]),
    ({"controls": [{"model": "nano-canny", "image": "IMG", "mode": "loud"}]}, 422, ["controls.0.mode"]),
    ({"controls": [{"model": "nano-canny"}]}, 400, ["controls.0.image", "no image"]),
    ({"prompt": 5}, 422, ["prompt"]),
    # Control.check(), before the request is queued
    ({"controls": [{"model": "nano-canny", "image": "IMG", "annotator": "canny", "params": {"lo": 1}}]}, 400,
     ["controls.0", "unknown parameter", "lo"]),
])
def test_generate_errors(server, shapes_sample, change, status, words):
    _, maps = shapes_sample
    payload = {"prompt": "a red circle", "steps": 2, **change}
    for u in payload.get("controls", []):
        if u.get("image") == "IMG":
            u["image"] = b64png(maps["target"])
    got, r, _ = server.post("/api/generate", payload)
    assert got == status and all(w in r["error"] for w in words), r


def test_bad_bodies(server):
    status, headers, body = server.request("POST", "/api/generate", b"{not json", {"Content-Type": "application/json"})
    assert status == 400 and b"not valid JSON" in body
    status, headers, body = server.request("POST", "/api/generate", b"x", {"Content-Type": "text/plain"})
    assert status == 415
    status, r = server.multipart("/api/generate", {"request": "[1, 2]"}, {})
    assert status == 400 and "must be a JSON object" in r["error"]


def test_oversize_upload_and_pixels(server):
    # 2 MB of body announced against a 1 MB limit: refused from the headers, before any of it is read
    status, r = server.headers_only("/api/detect", 2 * 2 ** 20)
    assert status == 413 and "limit" in r["error"]
    # a small file that decodes to 2000 x 2000 = 4 MP against a 1 MP limit: refused from its header
    status, r, _ = server.post("/api/detect", {"image": b64png(np.zeros((2000, 2000, 3), np.uint8)),
                                               "annotator": "canny"})
    assert status == 413 and "1,000,000 pixels" in r["error"]
    assert server.get("/api/health")[0] == 200


def test_burst_gets_200_or_503_and_the_server_stays_healthy(server, shapes_sample):
    """Six at once against a queue of 1, over real sockets. How many get in depends on timing, so
    this asserts only what holds at any speed: the first to arrive runs, the others run or are
    refused with Retry-After, and nothing is left behind. That a full queue answers 503 is
    test_serve_handlers.py::test_a_full_queue_answers_503_at_once (the model held by an Event)."""
    _, maps = shapes_sample
    payload = {"prompt": "a blue square", "steps": 6,
               "controls": [{"model": "nano-canny", "image": b64png(maps["canny"])}]}
    results = []

    def one():
        status, r, headers = server.post("/api/generate", payload)
        results.append((status, headers.get("Retry-After"), r))
    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()  # each request has the client's own timeout
    statuses = sorted(s for s, _, _ in results)
    assert len(results) == 6 and set(statuses) <= {200, 503} and 200 in statuses, statuses
    assert all(ra and int(ra) >= 1 for s, ra, _ in results if s == 503)
    status, health = server.get("/api/health")
    assert status == 200 and health["queue"]["running"] is False and health["queue"]["queued"] == 0
    status, r, _ = server.post("/api/generate", {**payload, "steps": 2})
    assert status == 200


def test_cli_names_a_missing_controlnet(capsys):
    from ctrlnet.cli import main
    assert main(["serve", "--controlnet", "mine=/no/such/net.safetensors"]) == 2
    err = capsys.readouterr().err
    assert "--controlnet mine=/no/such/net.safetensors: no such ControlNet file" in err
    assert err.count("/no/such/net.safetensors") == 1  # the path once
    assert "not a bundled name (nano-canny" in err  # names go through the one resolver


def test_compiled_server_runs_every_generation_on_one_model_thread(shapes_sample):
    """ServeConfig(compile=...) (`ctrlnet serve --compile`): the Pipeline compiles its UNet and
    ControlNets, and requests arriving on different HTTP threads all run on the one model thread
    (per-thread state such as CUDA graph trees is made once), with the eager images."""
    import torch._dynamo
    from ctrlnet import Control, Pipeline
    from ctrlnet.serve import ServeConfig, Server
    from ctrlnet.serve.schemas import GenerateRequest
    sample, maps = shapes_sample
    req = GenerateRequest(prompt=sample.prompt, steps=3, seed=7, controls=[{"model": "nano-canny"}])
    torch._dynamo.reset()
    try:
        server = Server(ServeConfig(compile={"backend": "aot_eager", "dynamic": False}))
        steps, results = [], []
        for _ in range(2):  # each request from its own thread, as the HTTP server's thread pool does
            t = threading.Thread(target=lambda: results.append(server.generate(
                req, server.controls(req, [maps["canny"]]),
                on_step=lambda i: steps.append(threading.current_thread().name))))
            t.start()
            t.join(300)
        assert len(results) == 2 and len(steps) == 6
        assert len(set(steps)) == 1 and steps[0].startswith("ctrlnet-model")
        assert len(server.pipe._compiled) == 2  # the UNet's and nano-canny's torch.compile wrappers
    finally:
        torch._dynamo.reset()
    ref = Pipeline.from_pretrained("nano", controlnets=["nano-canny"])(
        sample.prompt, controls=[Control("nano-canny", maps["canny"])], steps=3, seed=7).images[0]
    for r in results:
        got = np.asarray(decode_data_url(r["images"][0]).convert("RGB")).astype(int)
        assert np.abs(got - np.asarray(ref).astype(int)).max() <= 2

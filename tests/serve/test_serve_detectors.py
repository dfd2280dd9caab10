"""A neural annotator through the server: listed as unavailable with the reason (which names the
file and where it is published, never the server's paths) until its weights are in place, then
detecting through /api/detect like the Python API; a client can never pick a weight file."""

import asyncio

import numpy as np
import pytest

from servekit import asgi_json, b64png, decode_data_url

pytest.importorskip("fastapi")

from ctrlnet.annotators import get_annotator, hed  # noqa: E402
from ctrlnet.annotators import weights as W  # noqa: E402
from ctrlnet.serve import ServeConfig  # noqa: E402
from ctrlnet.serve import app as http  # noqa: E402
from ctrlnet.serve.server import Server  # noqa: E402


@pytest.fixture(scope="module")
def app():
    return http.create_app(ServeConfig(queue=1), server=Server(ServeConfig(queue=1)))


@pytest.fixture
def places(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("CTRLNET_ANNOTATORS", str(tmp_path / "weights"))
    W.clear_cache()
    yield tmp_path
    W.clear_cache()


def photo():
    rng = np.random.default_rng(0)
    a = np.full((64, 96, 3), 200, np.uint8)
    a[16:48, 24:72] = rng.integers(0, 255, 3)
    return a


def test_unavailable_then_available_and_detecting(app, places):
    status, _, listed = asyncio.run(asgi_json(app, "GET", "/api/annotators"))
    entry = next(a for a in listed if a["name"] == "softedge_hed")
    assert status == 200 and not entry["available"] and "model" not in entry["params"]
    assert "ControlNetHED.pth" in entry["reason"] and "huggingface.co/lllyasviel/Annotators" in entry["reason"]
    assert str(places) not in entry["reason"]  # the server's folders are not told to clients
    status, _, r = asyncio.run(asgi_json(app, "POST", "/api/detect", {"image": b64png(photo()),
                                                                      "annotator": "softedge_hed"}))
    assert status == 400 and "softedge_hed" in r["error"] and "not available" in r["error"]

    hed.write_random_weights(places / "weights", seed=0)
    status, _, listed = asyncio.run(asgi_json(app, "GET", "/api/annotators"))
    assert next(a for a in listed if a["name"] == "softedge_hed")["available"]
    status, _, r = asyncio.run(asgi_json(app, "POST", "/api/detect", {"image": b64png(photo()),
                                                                      "annotator": "softedge_hed"}))
    assert status == 200, r
    got = np.asarray(decode_data_url(r["image"]).convert("RGB"))
    assert np.array_equal(got, get_annotator("softedge_hed")(photo()))


def test_a_client_cannot_name_a_weight_file(app, places):
    hed.write_random_weights(places / "weights", seed=0)
    status, _, r = asyncio.run(asgi_json(app, "POST", "/api/detect", {
        "image": b64png(photo()), "annotator": "softedge_hed", "params": {"model": "/etc/passwd"}}))
    assert status == 400 and "params.model" in r["error"] and "no weight paths" in r["error"]
    status, _, r = asyncio.run(asgi_json(app, "POST", "/api/generate", {
        "prompt": "x", "steps": 1, "controls": [{"model": "nano-canny", "image": b64png(photo()),
                                                 "annotator": "softedge_hed", "params": {"model": "/etc/passwd"}}]}))
    assert status == 400 and "controls.0.params.model" in r["error"]


def test_a_bad_weight_file_is_a_400_without_the_servers_paths(app, places):
    (places / "weights").mkdir()
    (places / "weights" / "ControlNetHED.pth").write_bytes(b"not a checkpoint")
    status, _, r = asyncio.run(asgi_json(app, "POST", "/api/detect", {"image": b64png(photo()),
                                                                      "annotator": "softedge_hed"}))
    assert status == 400 and "could not be loaded" in r["error"] and str(places) not in r["error"]

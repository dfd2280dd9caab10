"""A real `ctrlnet serve` process on loopback with the bundled nano models, shared by the tests."""

import os
import subprocess
import sys
import time
import urllib.error

import pytest

from servekit import Client, free_port

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


@pytest.fixture(scope="session")
def shapes_sample():
    """A ShapesWorld target image and its exact maps (seed 1, index 3)."""
    from ctrlnet.testbed.shapes import render, sample_layout
    s = sample_layout(3, seed=1, size=128)
    return s, render(s, 128)


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """`python -m ctrlnet.cli serve` on a free loopback port; small limits so the tests can hit them."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    cmd = [sys.executable, "-m", "ctrlnet.cli", "serve", "--port", str(port), "--queue", "1",
           "--max-upload-mb", "1", "--max-pixels", "1000000", "--max-steps", "50", "--max-images", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    client = Client(f"http://127.0.0.1:{port}")
    deadline = time.time() + 180
    while True:
        if proc.poll() is not None:
            pytest.fail(f"ctrlnet serve exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if client.get("/api/health")[0] == 200:
                break
        except (urllib.error.URLError, ConnectionError):
            pass
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"ctrlnet serve did not come up in 180 s:\n{log.read_text()}")
        time.sleep(0.5)
    client.proc, client.log = proc, log
    yield client
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()

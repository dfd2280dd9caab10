"""Helpers for the serve tests: a plain-HTTP client (urllib, real sockets), an in-process ASGI
caller (no sockets, no httpx) and PNG codecs."""

import asyncio
import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
from PIL import Image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    """Plain HTTP (urllib) against the server: real sockets, no test client."""

    def __init__(self, url: str):
        self.url = url

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                timeout: float = 300):
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.headers, r.read()  # case-insensitive headers
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()

    def get(self, path: str):
        status, headers, body = self.request("GET", path)
        return status, json.loads(body) if headers.get("content-type", "").startswith("application/json") else body

    def post(self, path: str, payload: dict, timeout: float = 300):
        status, headers, body = self.request("POST", path, json.dumps(payload).encode(),
                                             {"Content-Type": "application/json"}, timeout)
        return status, json.loads(body), headers

    def headers_only(self, path: str, length: int) -> tuple[int, dict]:
        """POST headers announcing ``length`` body bytes and no body: the status and JSON the server
        answers from the headers alone. (Sending a body the server refuses races its close: the
        client may get a broken pipe instead of the answer.)"""
        host, port = self.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=60) as s:
            s.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {length}\r\n\r\n".encode())
            data = b""
            while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        return int(head.split()[1]), json.loads(body)

    def multipart(self, path: str, fields: dict[str, str], files: dict[str, bytes]):
        boundary = "----ctrlnet-test-boundary"
        parts = []
        for k, v in fields.items():
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
        for k, data in files.items():
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{k}.png"\r\n'
                         f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n")
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        status, headers, out = self.request("POST", path, body,
                                            {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        return status, json.loads(out)


def launch(args: list[str], log, weights_dir, headers: dict | None = None) -> "Client":
    """`python -m ctrlnet.cli serve --port P ARGS` on a free loopback port, with no detector weights
    to find (``weights_dir``: an empty folder); returns its Client (``.proc``, ``.log``) once
    /api/health answers (with ``headers``, e.g. credentials). The deadline only turns a hang into a
    failure, so it is far beyond any machine's load time."""
    import pytest
    port = free_port()
    cmd = [sys.executable, "-m", "ctrlnet.cli", "serve", "--port", str(port), *args]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
           "CTRLNET_ANNOTATORS": str(weights_dir), "HF_HUB_CACHE": str(weights_dir / "hub"),
           "HOME": str(weights_dir / "home")}
    env.pop("CTRLNET_API_AUTH", None)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    client = Client(f"http://127.0.0.1:{port}")
    deadline = time.time() + 900
    while True:
        if proc.poll() is not None:
            pytest.fail(f"ctrlnet serve exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if client.request("GET", "/api/health", headers=headers)[0] == 200:
                break
        except (urllib.error.URLError, ConnectionError):
            pass
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"ctrlnet serve did not come up in 900 s:\n{log.read_text()}")
        time.sleep(0.5)
    client.proc, client.log = proc, log
    return client


def stop(client: "Client") -> None:
    client.proc.terminate()
    try:
        client.proc.wait(20)
    except subprocess.TimeoutExpired:
        client.proc.kill()


def _length(response: bytes) -> int:
    """The Content-Length of a raw HTTP response's head."""
    for line in response.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def asgi_scope(app, method: str, path: str, body: bytes, headers: dict | None) -> dict:
    head = {"content-length": str(len(body)), **{k.lower(): v for k, v in (headers or {}).items()}}
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "app": app,
            "headers": [(k.encode(), v.encode()) for k, v in head.items()],
            "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}


def make_request(app, body: bytes = b"", headers: dict | None = None, path: str = "/"):
    """A starlette Request carrying ``app`` and ``body``, to call a route handler with directly. Its
    client stays connected: after the body, receive() waits (for a disconnect that never comes)."""
    from starlette.requests import Request
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()
    return Request(asgi_scope(app, "POST", path, body, headers), receive)


class Hangup:
    """A client that hangs up on demand (``asgi_call(..., hangup=)``): after ``set()`` the app's next
    read gets ``http.disconnect``; ``delivered`` tells that the app has read it."""

    def __init__(self):
        self.event = asyncio.Event()
        self.delivered = False

    def set(self):
        self.event.set()


async def asgi_call(app, method: str, path: str, body: bytes = b"", headers: dict | None = None,
                    hangup: Hangup | None = None):
    """One request through the whole ASGI app (middleware, routing, exception handlers), in this
    event loop: (status, {header: value}, body bytes). The client stays connected until the
    response is complete, or until ``hangup`` is set."""
    done = asyncio.Event()
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        if hangup is not None:
            await hangup.event.wait()
            hangup.delivered = True
        else:
            await done.wait()
        return {"type": "http.disconnect"}
    start, chunks = {}, []

    async def send(message):
        if message["type"] == "http.response.start":
            start.update(message)
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                done.set()
    try:
        await app(asgi_scope(app, method, path, body, headers), receive, send)
    except Exception:
        if not done.is_set():  # Starlette re-raises after sending its 500: only a missing answer is a failure
            raise
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, b"".join(chunks)


async def asgi_json(app, method: str, path: str, payload=None):
    """``asgi_call`` with a JSON body and a JSON answer: (status, {header: value}, parsed body)."""
    body = b"" if payload is None else json.dumps(payload).encode()
    status, headers, out = await asgi_call(app, method, path, body, {"Content-Type": "application/json"})
    return status, headers, json.loads(out)


def wait_until(condition, what: str):
    """Await ``condition()`` (a state the test caused, not a duration): yields to the event loop;
    the bound only turns a bug into a failure instead of a hang."""
    import pytest

    async def poll():
        for _ in range(100_000):
            if condition():
                return
            await asyncio.sleep(0.001)
        pytest.fail(f"never happened: {what}")
    return poll()


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def sideways_jpeg(upright: np.ndarray) -> tuple[bytes, np.ndarray]:
    """(a JPEG of ``upright`` stored turned 90 degrees anticlockwise with EXIF orientation 6 - "turn
    90 degrees clockwise to view", as phone portraits are -, the stored pixels as any decoder that
    ignores the tag gives them, turned upright)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1))).save(buf, format="JPEG", quality=95, exif=exif)
    stored = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))  # PIL does not apply the tag
    return buf.getvalue(), np.ascontiguousarray(np.rot90(stored, -1))


def b64png(a: np.ndarray) -> str:
    return base64.b64encode(png(a)).decode()


def decode_data_url(url: str) -> Image.Image:
    assert url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))

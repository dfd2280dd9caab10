"""``ctrlnet serve``, the HTTP side: a local web page and a JSON API over one ``Server`` (FastAPI + uvicorn).

Routes (schema at ``/openapi.json``):
  GET  /                 the page (static/index.html, no external assets)
  GET  /api/health       {"ok": true, "queue": ...}
  GET  /api/models       base, ControlNets by name, schedulers, modes, defaults, limits
  GET  /api/annotators   name, one-line doc and parameters (with defaults) of each annotator
  GET  /api/progress     the running generation's step / total and the queue length
  POST /api/detect       image -> condition map             (JSON with base64, or multipart)
  POST /api/generate     prompt + control units -> images   (JSON with base64, or multipart)
  /sdapi/v1/*, /controlnet/*   AUTOMATIC1111's API and its ControlNet extension's (A1111_ROUTES; the
                         work is a1111.A1111's), with A1111's error body {"error", "detail", ...}

Safety: the server only reads the base and ControlNets the operator named at start (requests
name models, never paths; images travel in the request, results in the response, nothing is
written to disk); HTTP basic credentials on every route with ``api_auth`` (required beyond
loopback); bodies are capped in bytes (413) and images in pixels before decoding (413);
generation runs one at a time with at most ``queue`` requests waiting, then 503 + Retry-After,
and a waiting request whose client hangs up is dropped; images are scaled down to ``max_side`` /
``max_pixels`` and sizes derived from them stay within those caps; bad input is a 4xx
``{"error": "..."}`` naming the field; a 500 (a bug) says only that, the details go to the log.

Each route is a module-level function of the request; the ``Server`` it works on is
``request.app.state.server``, so a handler can be called with any request that carries an app.
This module needs the ``serve`` extra (fastapi) to import; ``ctrlnet.serve`` does not.
"""

import asyncio
import base64
import functools
import http
import json
import secrets
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

import pydantic
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from pydantic.json_schema import models_json_schema
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..version import __version__
from .config import ServeConfig, check_exposure, credentials
from .queue import ClientGone, GenerationQueue, QueueFull
from .schemas import (ControlUnitRequest, DetectRequest, DetectResponse, GenerateRequest, GenerateResponse,
                      validation_message)
from .a1111 import SCRIPTS, A1111, Img2ImgRequest, Txt2ImgRequest
from .extension import API_VERSION
from .server import ApiError, Server
from .uploads import UploadError, decode_base64, decode_image

STATIC = Path(__file__).resolve().parent / "static"
A1111_PREFIXES = ("/sdapi/", "/controlnet/")  # A1111's routes: its error body shape


# ---------------------------------------------------------------------- errors -> {"error": ...}

def error_body(path: str, status: int, message: str) -> dict:
    """``{"error": message}``; on A1111's routes its shape, ``{"error", "detail", "body", "errors"}``
    (clients show ``detail``)."""
    if path.startswith(A1111_PREFIXES):
        kind = http.HTTPStatus(status).phrase if status in http.HTTPStatus._value2member_map_ else "Error"
        return {"error": kind, "detail": message, "body": "", "errors": message}
    return {"error": message}


async def on_api_error(request: Request, e: ApiError) -> JSONResponse:
    return JSONResponse(error_body(request.url.path, e.status, e.message), status_code=e.status, headers=e.headers)


async def on_http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(error_body(request.url.path, e.status_code, str(e.detail)), status_code=e.status_code,
                        headers=getattr(e, "headers", None))


async def on_error(request: Request, e: Exception) -> JSONResponse:
    """A bug, not bad input: log it with its traceback, keep serving. The client gets the exception's
    type only: its message and traceback may hold file paths and library internals."""
    traceback.print_exception(e, file=sys.stderr)
    message = f"internal error ({type(e).__name__}); the server's log has the details"
    return JSONResponse(error_body(request.url.path, 500, message), status_code=500)


# ---------------------------------------------------------------------- request -> inputs

def server_of(request: Request) -> Server:
    return request.app.state.server


def parse_json(raw: str | bytes, where: str):
    """JSON text -> value; a 400 naming ``where`` when it is not JSON or nests too deeply (Python's
    parser recurses: 100000 nested lists are a RecursionError, a few hundred bytes of body)."""
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"{where}: not valid JSON ({e})") from None
    except RecursionError:
        raise ApiError(400, f"{where}: JSON nested too deeply") from None


async def read_request(request: Request, model: type[pydantic.BaseModel]):
    """(validated model, {file field: bytes}) from JSON or multipart (JSON in the 'request' field,
    or the model's fields as form fields)."""
    ctype = request.headers.get("content-type", "")
    uploads = {}
    if ctype.startswith("multipart/form-data"):
        try:
            form = await request.form(max_files=16, max_fields=64)
        except ApiError:  # over the body limit, raised while reading
            raise
        except Exception as e:  # malformed multipart
            raise ApiError(400, f"cannot parse multipart body: {e}") from None
        data = {}
        for key, value in form.multi_items():
            if hasattr(value, "read"):
                uploads[key] = await value.read()
            elif key == "request":
                fields = parse_json(value, "form field 'request'")
                if not isinstance(fields, dict):
                    raise ApiError(400, "form field 'request': must be a JSON object")
                data.update(fields)
            elif key == "params":
                data["params"] = parse_json(value, "form field 'params'")
            else:
                data[key] = value
    elif ctype.startswith("application/json") or not ctype:
        data = parse_json(await request.body() or b"null", "body")
    else:
        raise ApiError(415, f"content type {ctype!r}: send application/json or multipart/form-data")
    if not isinstance(data, dict):
        raise ApiError(400, "body must be a JSON object")
    try:
        return model.model_validate(data), uploads
    except pydantic.ValidationError as e:
        raise ApiError(422, validation_message(e, model.__name__)) from None


def image_of(b64: str | None, upload: bytes | None, where: str, max_pixels: int):
    """The (H, W, 3) uint8 image of a field: the multipart file if there is one, else the base64."""
    try:
        if upload is not None:
            return decode_image(upload, where, max_pixels)
        if b64 is None:
            raise UploadError(f"{where}: no image (base64 in the JSON, or a file in multipart)")
        return decode_image(decode_base64(b64, where), where, max_pixels)
    except UploadError as e:
        raise ApiError(e.status, str(e)) from None


async def watch_disconnect(request: Request, gone: threading.Event) -> None:
    """Set ``gone`` when the client hangs up. The body has been read, so the next ASGI message is
    ``http.disconnect``: the server sends it when the connection closes."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    gone.set()


async def run_queued(request: Request, queue: GenerationQueue, steps: int, fn):
    """Run ``fn(queue)`` in a worker thread once the model is free; 503 when the queue is full. A
    request whose client hangs up while it waits is dropped when its turn comes (499, which
    nobody reads), instead of computing what no one will receive."""
    try:
        queue.enter()
    except QueueFull as e:
        raise ApiError(503, str(e), {"Retry-After": str(e.retry_after)}) from None
    started = False
    gone = threading.Event()
    watcher = asyncio.ensure_future(watch_disconnect(request, gone))

    def work():
        nonlocal started
        started = True
        with queue.run(steps, gone) as q:  # leaves the queue when done
            return fn(q)
    try:
        return await run_in_threadpool(work)
    except ClientGone:
        raise ApiError(499, "the client closed the request before its turn; dropped") from None
    finally:
        watcher.cancel()
        if not started:  # cancelled before the worker ran: give the place back
            queue.leave()


# ---------------------------------------------------------------------- routes

async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")


async def health(request: Request) -> dict:
    return {"ok": True, "queue": server_of(request).generation.status()}


async def models(request: Request) -> dict:
    return server_of(request).models()


async def annotators(request: Request) -> list[dict]:
    return server_of(request).annotators()


async def progress(request: Request) -> dict:
    return server_of(request).generation.status()


async def detect(request: Request) -> dict:
    server = server_of(request)
    req, uploads = await read_request(request, DetectRequest)
    params = server.check_params(req.annotator, dict(req.params), "detect")
    rgb = server.fit(image_of(req.image, uploads.get("image"), "image", server.config.max_pixels))
    server.check_resolutions(rgb, params, "detect")
    return await run_queued(request, server.detection, 1, lambda q: server.detect(rgb, req.annotator, params))


async def generate(request: Request) -> dict:
    server = server_of(request)
    req, uploads = await read_request(request, GenerateRequest)
    server.check_generate(req)
    images = [server.fit(image_of(u.image, uploads.get(f"image{i}"), f"controls.{i}.image", server.config.max_pixels))
              for i, u in enumerate(req.controls)]
    pair_images = [[server.fit(image_of(p.image, None, f"controls.{i}.pairs.{k}.image", server.config.max_pixels))
                    for k, p in enumerate(u.pairs)] for i, u in enumerate(req.controls)]
    controls = server.controls(req, images, pair_images)
    req = server.sized(req, images)  # every check done: only now take a place in the queue
    return await run_queued(request, server.generation, req.steps,  # A1111's /interrupt stops it too
                            lambda q: server.generate(req, controls, q.on_step, q.interrupted))


# ---------------------------------------------------------------------- A1111's routes (a1111.A1111 does the work)

def a1111_of(request: Request) -> A1111:
    return request.app.state.a1111


async def json_body(request: Request) -> Any:
    if not request.headers.get("content-type", "application/json").startswith("application/json"):
        raise ApiError(415, "send application/json")
    return parse_json(await request.body() or b"null", "body")


async def sd_generate(request: Request, model: type[Txt2ImgRequest]) -> dict:
    api = a1111_of(request)
    body = await json_body(request)
    if not isinstance(body, dict):
        raise ApiError(422, "body must be a JSON object")
    try:
        req = model.model_validate(body)
    except pydantic.ValidationError as e:
        raise ApiError(422, validation_message(e, "request")) from None
    job = await run_in_threadpool(api.prepare, req)  # decodes and checks images: off the event loop
    result = await run_queued(request, api.server.generation, job.calls * job.n_iter,
                              lambda q: api.run(job, q.on_step, q.interrupted))
    return JSONResponse(result)  # as it is (FastAPI's encoder would walk every base64 string again)


async def sd_txt2img(request: Request) -> dict:
    return await sd_generate(request, Txt2ImgRequest)


async def sd_img2img(request: Request) -> dict:
    return await sd_generate(request, Img2ImgRequest)


async def sd_progress(request: Request) -> dict:
    return a1111_of(request).progress()


async def sd_interrupt(request: Request) -> dict:
    a1111_of(request).server.generation.interrupt()
    return {}


async def sd_models(request: Request) -> list[dict]:
    return [a1111_of(request).checkpoint()]


async def sd_samplers(request: Request) -> list[dict]:
    return A1111.samplers()


async def sd_schedulers(request: Request) -> list[dict]:
    return A1111.schedulers()


async def sd_options(request: Request) -> dict:
    return a1111_of(request).options()


async def sd_set_options(request: Request) -> None:
    a1111_of(request).set_options(await json_body(request))


async def sd_scripts(request: Request) -> dict:
    return {"txt2img": SCRIPTS, "img2img": SCRIPTS}


async def sd_nothing(request: Request) -> None:
    """refresh-checkpoints and the like: the server's models are fixed at start; nothing to do."""


async def sd_empty_list(request: Request) -> list:
    """What the server has none of (upscalers, VAEs, LoRAs, styles...): clients list them at start."""
    return []


async def cn_version(request: Request) -> dict:
    return {"version": API_VERSION}


async def cn_model_list(request: Request) -> dict:
    return a1111_of(request).model_list()


async def cn_module_list(request: Request, alias_names: bool = False) -> dict:
    return a1111_of(request).module_list(alias_names)


async def cn_control_types(request: Request) -> dict:
    return a1111_of(request).control_types()


async def cn_settings(request: Request) -> dict:
    return a1111_of(request).settings()


async def cn_detect(request: Request) -> dict:
    api = a1111_of(request)
    images, annotator, params = await run_in_threadpool(api.prepare_detect, await json_body(request))
    return await run_queued(request, api.server.detection, len(images),
                            lambda q: api.detect(images, annotator, params))


A1111_ROUTES = [  # (path, handler, methods)
    ("/sdapi/v1/txt2img", sd_txt2img, ["POST"]), ("/sdapi/v1/img2img", sd_img2img, ["POST"]),
    ("/sdapi/v1/progress", sd_progress, ["GET"]), ("/sdapi/v1/interrupt", sd_interrupt, ["POST"]),
    ("/sdapi/v1/sd-models", sd_models, ["GET"]), ("/sdapi/v1/samplers", sd_samplers, ["GET"]),
    ("/sdapi/v1/schedulers", sd_schedulers, ["GET"]), ("/sdapi/v1/options", sd_options, ["GET"]),
    ("/sdapi/v1/options", sd_set_options, ["POST"]), ("/sdapi/v1/scripts", sd_scripts, ["GET"]),
    ("/sdapi/v1/refresh-checkpoints", sd_nothing, ["POST"]),
    *[(f"/sdapi/v1/{name}", sd_empty_list, ["GET"]) for name in (
        "sd-vae", "upscalers", "latent-upscale-modes", "loras", "hypernetworks", "face-restorers", "prompt-styles")],
    ("/controlnet/version", cn_version, ["GET"]), ("/controlnet/model_list", cn_model_list, ["GET"]),
    ("/controlnet/module_list", cn_module_list, ["GET"]), ("/controlnet/control_types", cn_control_types, ["GET"]),
    ("/controlnet/settings", cn_settings, ["GET"]), ("/controlnet/detect", cn_detect, ["POST"]),
]


# ---------------------------------------------------------------------- the app

class BodyLimit:
    """ASGI middleware: 413 for bodies over ``limit`` bytes (Content-Length, or counted while read)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        message = f"request body over this server's limit of {self.limit / 2 ** 20:g} MB"
        path = scope.get("path", "")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._reject(send, path, message)
        seen = 0

        async def counted():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise ApiError(413, message)
            return msg
        try:
            await self.app(scope, counted, send)
        except ApiError as e:  # raised while a route was reading the body
            await self._reject(send, path, e.message)

    @staticmethod
    async def _reject(send, path: str, message: str):
        body = json.dumps(error_body(path, 413, message)).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class BasicAuth:
    """ASGI middleware: HTTP basic authentication on every route (A1111's ``--api-auth``), 401 with
    ``WWW-Authenticate: Basic`` otherwise; passwords compared in constant time."""

    def __init__(self, app, users: list[tuple[str, str]]):
        self.app = app
        self.tokens = [base64.b64encode(f"{u}:{p}".encode()).decode() for u, p in users]

    def allowed(self, header: bytes | None) -> bool:
        scheme, _, token = (header or b"").decode("latin-1").partition(" ")
        ok = False
        for t in self.tokens:  # every one compared, so the time says nothing about which matched
            ok |= secrets.compare_digest(token.strip().encode(), t.encode())
        return scheme.lower() == "basic" and ok

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.allowed(dict(scope.get("headers") or []).get(b"authorization")):
            return await self.app(scope, receive, send)
        body = json.dumps({"error": "Unauthorized", "detail": "Incorrect username or password"}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b'Basic realm="ctrlnet"')]})
        await send({"type": "http.response.body", "body": body})


def body_doc(model: type[pydantic.BaseModel], multipart: dict) -> dict:
    """The requestBody of a POST route: the model as JSON, or ``multipart`` as form fields."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}},
        "multipart/form-data": {"schema": multipart}}}}


DETECT_FORM = {"type": "object", "required": ["image", "annotator"], "properties": {
    "image": {"type": "string", "format": "binary"}, "annotator": {"type": "string"},
    "params": {"type": "string", "description": "JSON object"}}}
GENERATE_FORM = {"type": "object", "required": ["request"], "properties": {
    "request": {"type": "string", "description": "GenerateRequest as JSON"},
    "image0": {"type": "string", "format": "binary",
               "description": "image of controls[0] (image1 for controls[1], ...)"}}}


def openapi(app: FastAPI) -> dict:
    """FastAPI's schema plus the request models: the POST routes read their bodies themselves
    (JSON or multipart), so FastAPI does not see them."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)  # FastAPI's own, kept in app.openapi_schema
        _, defs = models_json_schema([(m, "validation") for m in (GenerateRequest, DetectRequest, ControlUnitRequest)],
                                     ref_template="#/components/schemas/{model}")
        schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
    return app.openapi_schema


def create_app(config: ServeConfig | None = None, server: Server | None = None) -> FastAPI:
    """The FastAPI app (models loaded now). ``server`` lets tests share one loaded Server."""
    config = config or (server.config if server is not None else ServeConfig())
    app = FastAPI(title="ctrlnet", version=__version__, docs_url=None, redoc_url=None,
                  description="ControlNet generation and condition detection over HTTP. Images are base64 "
                              "(or data URLs) in JSON, or files in multipart/form-data.")
    app.state.server = server or Server(config)
    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_error)
    app.add_api_route("/", page, methods=["GET"], include_in_schema=False)
    app.add_api_route("/api/health", health, methods=["GET"])
    app.add_api_route("/api/models", models, methods=["GET"])
    app.add_api_route("/api/annotators", annotators, methods=["GET"])
    app.add_api_route("/api/progress", progress, methods=["GET"])
    app.add_api_route("/api/detect", detect, methods=["POST"], response_model=DetectResponse,
                      openapi_extra=body_doc(DetectRequest, DETECT_FORM))
    app.add_api_route("/api/generate", generate, methods=["POST"], response_model=GenerateResponse,
                      openapi_extra=body_doc(GenerateRequest, GENERATE_FORM))
    app.state.a1111 = A1111(app.state.server)
    for path, handler, methods in A1111_ROUTES:
        app.add_api_route(path, handler, methods=methods, tags=["A1111"])
    app.openapi = functools.partial(openapi, app)
    app.add_middleware(BodyLimit, limit=int(config.max_upload_mb * 2 ** 20))
    users = credentials(config.api_auth)
    if users:  # added last, so it runs first: nothing is read from a client that has not logged in
        app.add_middleware(BasicAuth, users=users)
    return app


# ---------------------------------------------------------------------- running it

def run(config: ServeConfig) -> None:
    """Load the models and serve until interrupted (``ctrlnet.serve.serve`` checks the extra first)."""
    import uvicorn  # the serve extra, like fastapi; only running needs it, not create_app
    check_exposure(config)  # beyond loopback only with credentials
    app = create_app(config)
    for message in app.state.server.load_warnings:
        print(f"ctrlnet serve: warning: {message}", file=sys.stderr)
    print(f"ctrlnet serve: http://{config.host}:{config.port}/ (API schema at /openapi.json)", file=sys.stderr)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning")

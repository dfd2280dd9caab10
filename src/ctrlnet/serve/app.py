"""``ctrlnet serve``, the HTTP side: a local web page and a JSON API over one ``Server`` (FastAPI + uvicorn).

Routes (schema at ``/openapi.json``):
  GET  /                 the page (static/index.html, no external assets)
  GET  /api/health       {"ok": true, "queue": ...}
  GET  /api/models       base, ControlNets by name, schedulers, modes, defaults, limits
  GET  /api/annotators   name, one-line doc and parameters (with defaults) of each annotator
  GET  /api/progress     the running generation's step / total and the queue length
  POST /api/detect       image -> condition map             (JSON with base64, or multipart)
  POST /api/generate     prompt + control units -> images   (JSON with base64, or multipart)

Safety: the server only reads the base and ControlNets the operator named at start (requests
name models, never paths; images travel in the request, results in the response, nothing is
written to disk); bodies are capped in bytes (413) and images in pixels before decoding (413);
generation runs one at a time with at most ``queue`` requests waiting, then 503 + Retry-After;
bad input is a 4xx ``{"error": "..."}`` naming the field.

Each route is a module-level function of the request; the ``Server`` it works on is
``request.app.state.server``, so a handler can be called with any request that carries an app.
This module needs the ``serve`` extra (fastapi) to import; ``ctrlnet.serve`` does not.
"""

import functools
import json
import sys
import traceback
from pathlib import Path

import pydantic
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from pydantic.json_schema import models_json_schema
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..version import __version__
from .config import ServeConfig
from .queue import GenerationQueue, QueueFull
from .schemas import (ControlUnitRequest, DetectRequest, DetectResponse, GenerateRequest, GenerateResponse,
                      validation_message)
from .server import ApiError, Server
from .uploads import UploadError, decode_base64, decode_image

STATIC = Path(__file__).resolve().parent / "static"


# ---------------------------------------------------------------------- errors -> {"error": ...}

async def on_api_error(request: Request, e: ApiError) -> JSONResponse:
    return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)


async def on_http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"error": str(e.detail)}, status_code=e.status_code)


async def on_error(request: Request, e: Exception) -> JSONResponse:
    """A bug, not bad input: log it, keep serving."""
    traceback.print_exc(file=sys.stderr)
    return JSONResponse({"error": f"internal error: {type(e).__name__}: {e}"}, status_code=500)


# ---------------------------------------------------------------------- request -> inputs

def server_of(request: Request) -> Server:
    return request.app.state.server


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
                try:
                    fields = json.loads(value)
                except json.JSONDecodeError as e:
                    raise ApiError(400, f"form field 'request': not JSON ({e})") from None
                if not isinstance(fields, dict):
                    raise ApiError(400, "form field 'request': must be a JSON object")
                data.update(fields)
            elif key == "params":
                try:
                    data["params"] = json.loads(value)
                except json.JSONDecodeError as e:
                    raise ApiError(400, f"form field 'params': not JSON ({e})") from None
            else:
                data[key] = value
    elif ctype.startswith("application/json") or not ctype:
        raw = await request.body()
        try:
            data = json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"body is not valid JSON ({e})") from None
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


async def run_queued(queue: GenerationQueue, steps: int, fn):
    """Run ``fn(queue)`` in a worker thread once the model is free; 503 when the queue is full."""
    try:
        queue.enter()
    except QueueFull as e:
        raise ApiError(503, str(e), {"Retry-After": str(e.retry_after)}) from None
    started = False

    def work():
        nonlocal started
        started = True
        with queue.run(steps) as q:  # leaves the queue when done
            return fn(q)
    try:
        return await run_in_threadpool(work)
    finally:
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
    params = server.check_params(dict(req.params), "detect")
    rgb = image_of(req.image, uploads.get("image"), "image", server.config.max_pixels)
    return await run_queued(server.detection, 1, lambda q: server.detect(rgb, req.annotator, params))


async def generate(request: Request) -> dict:
    server = server_of(request)
    req, uploads = await read_request(request, GenerateRequest)
    server.check_generate(req)
    images = [image_of(u.image, uploads.get(f"image{i}"), f"controls.{i}.image", server.config.max_pixels)
              for i, u in enumerate(req.controls)]
    controls = server.controls(req, images)  # every check done: only now take a place in the queue
    return await run_queued(server.generation, req.steps, lambda q: server.generate(req, controls, q.on_step))


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
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._reject(send, message)
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
            await self._reject(send, e.message)

    @staticmethod
    async def _reject(send, message: str):
        body = json.dumps({"error": message}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
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
    app.openapi = functools.partial(openapi, app)
    app.add_middleware(BodyLimit, limit=int(config.max_upload_mb * 2 ** 20))
    return app


# ---------------------------------------------------------------------- running it

def is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


def run(config: ServeConfig) -> None:
    """Load the models and serve until interrupted (``ctrlnet.serve.serve`` checks the extra first)."""
    import uvicorn  # the serve extra, like fastapi; only running needs it, not create_app
    if not is_loopback(config.host):
        print(f"ctrlnet serve: warning: listening on {config.host}: anyone who can reach this port can generate "
              "(there is no authentication)", file=sys.stderr)
    app = create_app(config)
    print(f"ctrlnet serve: http://{config.host}:{config.port}/ (API schema at /openapi.json)", file=sys.stderr)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning")

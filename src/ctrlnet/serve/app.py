"""``ctrlnet serve``: a local web page and a JSON API over one loaded Pipeline (FastAPI + uvicorn).

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
"""


import inspect
import json
import math
import sys
import time
import traceback
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .queue import GenerationQueue, QueueFull
from ..images import RESIZE_MODES, png_bytes
from .uploads import UploadError, data_url, decode_base64, decode_image

STATIC = Path(__file__).resolve().parent / "static"


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 7860
    base: str = "nano"
    # name -> path (file or folder); the bundled nano nets are added when the base is nano
    controlnets: dict[str, str] = field(default_factory=dict)
    dtype: str = "fp32"
    queue: int = 4                   # requests that may wait behind the running generation
    max_upload_mb: float = 16.0      # whole request body
    max_pixels: int = 4096 * 4096    # per uploaded image, checked before decoding
    max_side: int = 1024             # output width/height, and detect/image resolution
    max_steps: int = 100
    max_images: int = 4              # images per request
    max_controls: int = 4
    # torch.compile the UNet and ControlNets (Pipeline(compile=...)): True, or torch.compile's kwargs
    # (used when the Server loads the base; a Pipeline handed to Server keeps its own setting)
    compile: Union[bool, dict] = False


# ---------------------------------------------------------------------- request / response schemas

class ControlUnit(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model: str = Field(description="a ControlNet name from GET /api/models")
    image: str | None = Field(None, description="base64 PNG/JPEG/WebP or data URL; multipart: file field imageN")
    annotator: str = Field("", description="detector run on the image first ('' = the image is the condition)")
    params: dict[str, Union[int, float, str, bool]] = Field(default_factory=dict, description="annotator parameters")
    scale: Union[float, list[float]] = Field(1.0, description="weight: one float or one per residual")
    start: float = Field(0.0, ge=0, le=1)
    end: float = Field(1.0, ge=0, le=1)
    mode: Literal["balanced", "prompt", "control"] = "balanced"
    resize_mode: Literal["just_resize", "crop_and_resize", "resize_and_fill"] = "crop_and_resize"


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(max_length=4000)
    negative_prompt: str = Field("", max_length=4000)
    steps: int = Field(20, ge=1)
    guidance: float | None = Field(None, ge=0, le=50, description="default: the base's own")
    guidance_rescale: float | None = Field(None, ge=0, le=1)
    seed: int = Field(0, ge=0, lt=2 ** 63)
    num_images: int = Field(1, ge=1)
    width: int | None = Field(None, ge=8)
    height: int | None = Field(None, ge=8)
    scheduler: str = "ddim"
    controls: list[ControlUnit] = Field(default_factory=list)


class GenerateResponse(BaseModel):
    images: list[str] = Field(description="PNG data URLs, with the A1111 'parameters' text chunk")
    conditions: list[str] = Field(description="the condition map each control unit used, PNG data URLs")
    parameters: list[str]
    seeds: list[int]
    width: int
    height: int
    seconds: float
    warnings: list[str]


class DetectRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str | None = Field(None, description="base64 or data URL; multipart: file field 'image'")
    annotator: str
    params: dict[str, Union[int, float, str, bool]] = Field(default_factory=dict)


class DetectResponse(BaseModel):
    image: str = Field(description="the condition map, PNG data URL")
    width: int
    height: int
    seconds: float


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def validation_message(e: ValidationError, what: str) -> str:
    parts = []
    for err in e.errors()[:5]:
        loc = ".".join(str(x) for x in err["loc"]) or what
        parts.append(f"{loc}: {err['msg']}")
    return f"{what}: " + "; ".join(parts)


# ---------------------------------------------------------------------- the state behind the routes

class Server:
    """The loaded pipeline, the named ControlNets and the queues; the routes call into it."""

    def __init__(self, config: ServeConfig, pipeline=None):
        from ..pipeline.controlled import Pipeline
        from ..formats import load_controlnet
        self.config = config
        if pipeline is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pipeline = Pipeline.from_pretrained(config.base, dtype=config.dtype, compile=config.compile)
        self.pipe = pipeline
        # every generation runs on this one thread, whichever HTTP thread took the request: CUDA graph
        # trees (compile on a GPU) record one set of graphs per thread, so they are recorded once
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctrlnet-model")
        named = dict(config.controlnets)
        if config.base == "nano":
            from ..testbed import bundled_controlnets
            named = {**{k: str(v) for k, v in bundled_controlnets().items()}, **named}
        for name, path in named.items():  # loaded now: requests can only pick among these
            self.pipe.add_controlnet(name, load_controlnet(path, dtype=self.pipe.dtype))
        self.generation = GenerationQueue(config.queue)
        self.detection = GenerationQueue(2 * config.queue)

    # ------------------------------------------------------------------ info

    def models(self) -> dict:
        from ..annotators import ANNOTATORS
        from ..pipeline.sampling import CONTROL_MODES
        from ..pipeline.schedulers import SCHEDULERS
        base = self.pipe.base
        zsnr = bool(base.scheduler.config.get("rescale_betas_zero_snr", False))
        native = base.unet.config.sample_size * base.vae_scale_factor
        nets = []
        for name in self.pipe.controlnets:
            # the annotator whose maps a net was trained on, when its name says it (nano-canny -> canny)
            suggested = next((a for a in sorted(ANNOTATORS, key=len, reverse=True) if a in name.lower()), "")
            nets.append({"name": name, "annotator": suggested})
        c = self.config
        return {"base": self.pipe.name, "controlnets": nets, "schedulers": list(SCHEDULERS),
                "modes": list(CONTROL_MODES), "resize_modes": list(RESIZE_MODES),
                "defaults": {"steps": 20, "guidance": 2.5 if zsnr else 7.5,
                             "guidance_rescale": 0.7 if zsnr else 0.0, "width": native, "height": native,
                             "scheduler": "ddim"},
                "size_multiple": self.pipe.size_multiple,
                "limits": {"max_upload_mb": c.max_upload_mb, "max_pixels": c.max_pixels, "max_side": c.max_side,
                           "max_steps": c.max_steps, "max_images": c.max_images, "max_controls": c.max_controls,
                           "queue": c.queue}}

    @staticmethod
    def annotators() -> list[dict]:
        from ..annotators import ANNOTATORS, NEEDS, available
        out = []
        for name, fn in ANNOTATORS.items():
            params = {p.name: p.default for p in inspect.signature(fn).parameters.values()
                      if p.name != "image" and p.default is not inspect.Parameter.empty}
            doc = (inspect.getdoc(fn) or "").split("\n")[0]
            out.append({"name": name, "doc": doc, "params": params, "available": available(name),
                        "needs": NEEDS.get(name, "")})
        return out

    # ------------------------------------------------------------------ checks

    def check_params(self, params: dict, where: str) -> dict:
        """Resolutions within [64, max_side]; other numbers finite and within +-1024 (a kernel size or
        cluster count from a request must not be able to tie the server up); seeds any 32-bit value."""
        for key, v in params.items():
            if key in ("detect_resolution", "image_resolution"):
                if not (isinstance(v, int) and not isinstance(v, bool) and 64 <= v <= self.config.max_side):
                    raise ApiError(400, f"{where}.params.{key}: must be an integer in [64, {self.config.max_side}]")
            elif key == "seed":
                if not (isinstance(v, int) and 0 <= v < 2 ** 32):
                    raise ApiError(400, f"{where}.params.seed: must be an integer in [0, 2**32)")
            elif isinstance(v, (int, float)) and not isinstance(v, bool) and not (math.isfinite(v) and abs(v) <= 1024):
                raise ApiError(400, f"{where}.params.{key}: {v} is out of range (|value| <= 1024)")
        return params

    def check_generate(self, req: GenerateRequest) -> None:
        c = self.config
        from ..pipeline.schedulers import SCHEDULERS
        if req.steps > c.max_steps:
            raise ApiError(400, f"steps: {req.steps} is over this server's limit of {c.max_steps}")
        if req.num_images > c.max_images:
            raise ApiError(400, f"num_images: {req.num_images} is over this server's limit of {c.max_images}")
        for key in ("width", "height"):
            v = getattr(req, key)
            if v is not None and v > c.max_side:
                raise ApiError(400, f"{key}: {v} is over this server's limit of {c.max_side}")
        if len(req.controls) > c.max_controls:
            raise ApiError(400, f"controls: {len(req.controls)} units, this server allows {c.max_controls}")
        key = req.scheduler.lower().replace("-", "_").replace("+", "p").replace(" ", "_")
        if key not in SCHEDULERS:
            raise ApiError(400, f"scheduler: unknown {req.scheduler!r}; available: {', '.join(SCHEDULERS)}")
        for i, u in enumerate(req.controls):
            if u.model not in self.pipe.controlnets:
                raise ApiError(400, f"controls.{i}.model: unknown ControlNet {u.model!r}; available: "
                                    f"{', '.join(self.pipe.controlnets) or 'none'}")
            if u.start > u.end:
                raise ApiError(400, f"controls.{i}: start ({u.start}) is after end ({u.end})")
            if u.annotator == "inpaint":
                raise ApiError(400, f"controls.{i}.annotator: inpaint is not offered by the server")
            self.check_params(u.params, f"controls.{i}")

    # ------------------------------------------------------------------ work (runs in a worker thread)

    def detect(self, rgb, annotator: str, params: dict) -> dict:
        from ..annotators import get_annotator
        t0 = time.perf_counter()
        try:
            fn = get_annotator(annotator, **params)
            out = fn(rgb)
        except (ValueError, TypeError) as e:
            raise ApiError(400, f"annotator {annotator!r}: {e}") from None
        return {"image": data_url(png_bytes(out)), "width": int(out.shape[1]), "height": int(out.shape[0]),
                "seconds": round(time.perf_counter() - t0, 3)}

    def generate(self, req: GenerateRequest, images: list, on_step=None) -> dict:
        from ..pipeline.controlled import Control, PromptTruncatedWarning
        controls = [Control(model=u.model, image=img, annotator=u.annotator, annotator_params=dict(u.params),
                            scale=u.scale, start=u.start, end=u.end, mode=u.mode, resize_mode=u.resize_mode)
                    for u, img in zip(req.controls, images)]
        t0 = time.perf_counter()

        def work():  # on the model thread; its warnings are caught there
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = self.pipe(req.prompt, controls=controls, negative_prompt=req.negative_prompt,
                                   steps=req.steps, guidance=req.guidance, guidance_rescale=req.guidance_rescale,
                                   seed=req.seed, num_images=req.num_images, width=req.width, height=req.height,
                                   scheduler=req.scheduler, callback=on_step)
            return result, [str(w.message) for w in caught if issubclass(w.category, PromptTruncatedWarning)]
        try:
            result, notes = self.model_thread.submit(work).result()
        except ValueError as e:  # the pipeline's own checks: annotator parameters, images, ...
            raise ApiError(400, str(e)) from None
        w, h = result.images[0].size
        return {"images": [data_url(png_bytes(im, p)) for im, p in zip(result.images, result.parameters)],
                "conditions": [data_url(png_bytes(m)) for m in result.conditions],
                "parameters": result.parameters, "seeds": [req.seed + i for i in range(len(result.images))],
                "width": w, "height": h, "seconds": round(time.perf_counter() - t0, 3), "warnings": notes}


# ---------------------------------------------------------------------- HTTP

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


def _body_doc(model: type[BaseModel], multipart: dict) -> dict:
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}},
        "multipart/form-data": {"schema": multipart}}}}


def create_app(config: ServeConfig | None = None, server: Server | None = None):
    """The FastAPI app (models loaded now). ``server`` lets tests share one loaded Server."""
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from .. import __version__
    config = config or ServeConfig()
    server = server or Server(config)
    app = FastAPI(title="ctrlnet", version=__version__, docs_url=None, redoc_url=None,
                  description="ControlNet generation and condition detection over HTTP. Images are base64 "
                              "(or data URLs) in JSON, or files in multipart/form-data.")
    app.state.server = server
    max_pixels = config.max_pixels

    @app.exception_handler(ApiError)
    async def on_api_error(request, e: ApiError):
        return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request, e):
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code)

    @app.exception_handler(Exception)
    async def on_error(request, e: Exception):  # a bug, not bad input: log it, keep serving
        traceback.print_exc(file=sys.stderr)
        return JSONResponse({"error": f"internal error: {type(e).__name__}: {e}"}, status_code=500)

    async def read_request(request: Request, model: type[BaseModel]):
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
        except ValidationError as e:
            raise ApiError(422, validation_message(e, model.__name__)) from None

    def image_of(b64: str | None, upload: bytes | None, where: str):
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

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/api/health")
    async def health() -> dict:
        return {"ok": True, "queue": server.generation.status()}

    @app.get("/api/models")
    async def models() -> dict:
        return server.models()

    @app.get("/api/annotators")
    async def annotators() -> list[dict]:
        return server.annotators()

    @app.get("/api/progress")
    async def progress() -> dict:
        return server.generation.status()

    @app.post("/api/detect", response_model=DetectResponse,
              openapi_extra=_body_doc(DetectRequest, {"type": "object", "required": ["image", "annotator"],
                                                      "properties": {"image": {"type": "string", "format": "binary"},
                                                                     "annotator": {"type": "string"},
                                                                     "params": {"type": "string",
                                                                                "description": "JSON object"}}}))
    async def detect(request: Request):
        req, uploads = await read_request(request, DetectRequest)
        params = server.check_params(dict(req.params), "detect")
        rgb = image_of(req.image, uploads.get("image"), "image")
        return await run_queued(server.detection, 1, lambda q: server.detect(rgb, req.annotator, params))

    @app.post("/api/generate", response_model=GenerateResponse,
              openapi_extra=_body_doc(GenerateRequest, {"type": "object", "required": ["request"], "properties": {
                  "request": {"type": "string", "description": "GenerateRequest as JSON"},
                  "image0": {"type": "string", "format": "binary",
                             "description": "image of controls[0] (image1 for controls[1], ...)"}}}))
    async def generate(request: Request):
        req, uploads = await read_request(request, GenerateRequest)
        server.check_generate(req)
        images = [image_of(u.image, uploads.get(f"image{i}"), f"controls.{i}.image")
                  for i, u in enumerate(req.controls)]
        return await run_queued(server.generation, req.steps, lambda q: server.generate(req, images, q.on_step))

    default_openapi = app.openapi

    def openapi():
        if app.openapi_schema:
            return app.openapi_schema
        schema = default_openapi()
        from pydantic.json_schema import models_json_schema
        _, defs = models_json_schema([(m, "validation") for m in (GenerateRequest, DetectRequest, ControlUnit)],
                                     ref_template="#/components/schemas/{model}")
        schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
        return schema
    app.openapi = openapi
    app.add_middleware(BodyLimit, limit=int(config.max_upload_mb * 2 ** 20))
    return app


def is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


def serve(config: ServeConfig) -> None:
    """Load the models and serve until interrupted."""
    try:
        import uvicorn  # noqa: F401
        import fastapi  # noqa: F401
        import multipart  # noqa: F401  (python-multipart)
    except ImportError as e:
        raise ValueError(f"ctrlnet serve needs the serve extra ({e.name} is missing): "
                         "pip install 'ctrlnet[serve]'") from None
    import uvicorn
    if not is_loopback(config.host):
        print(f"ctrlnet serve: warning: listening on {config.host}: anyone who can reach this port can generate "
              "(there is no authentication)", file=sys.stderr)
    app = create_app(config)
    print(f"ctrlnet serve: http://{config.host}:{config.port}/ (API schema at /openapi.json)", file=sys.stderr)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning")

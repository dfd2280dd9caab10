"""The state behind the routes: the loaded Pipeline and ControlNets, the queues, the checks a
request passes before it is queued, and the work itself. No HTTP here (``app`` is the HTTP side),
so all of it can be called directly."""

import importlib.util
import inspect
import math
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

from ..annotators import ALIASES, ANNOTATORS, NEEDS, WEIGHTS, check_params, get_annotator, resolution_size
from ..annotators.weights import WeightsError, WeightsNotFound, locate_any, options
from ..formats import kind_name, load_control
from ..images import RESIZE_MODES, png_bytes, resize_any
from ..names import base_path, is_nano
from ..pipeline import Control, Pipeline, PromptTruncatedWarning, SlowDtypeWarning
from ..pipeline.ranges import check_args, check_seed
from ..pipeline.sampling import CONTROL_MODES
from ..pipeline.schedulers import SCHEDULERS, scheduler_key
from ..testbed import bundled_controlnets
from .config import ServeConfig
from .queue import GenerationQueue
from .schemas import GenerateRequest
from .uploads import data_url


class ApiError(Exception):
    """Bad input (or a full queue): answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def weights_problem(annotator: str, e: Exception) -> str:
    """A detector's weight trouble as a client is told it: what kind, without the server's paths
    (its operator sees the full message with ``ctrlnet annotators``)."""
    kind = "not found" if isinstance(e, WeightsNotFound) else "could not be loaded"
    who = f"annotator {annotator!r}" if annotator else "an annotator"
    return f"{who}: its weights {kind} on this server; its operator can check them with `ctrlnet annotators`"


class Server:
    """The loaded pipeline, the named ControlNets and the queues; the routes call into it."""

    def __init__(self, config: ServeConfig, pipeline: Pipeline | None = None):
        self.config = config
        self.load_warnings: list[str] = []  # what the operator should hear (printed by `ctrlnet serve`)
        if pipeline is None:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")  # library chatter is dropped; a slow dtype is kept
                pipeline = Pipeline.from_pretrained(config.base, dtype=config.dtype, compile=config.compile,
                                                    tokenizer=config.tokenizer, backend=config.backend)
            self.load_warnings = list(dict.fromkeys(str(w.message) for w in caught
                                                    if issubclass(w.category, SlowDtypeWarning)))
        self.pipe = pipeline
        # every generation runs on this one thread, whichever HTTP thread took the request: CUDA graph
        # trees (compile on a GPU) record one set of graphs per thread, so they are recorded once
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctrlnet-model")
        named = dict(config.controlnets)
        if is_nano(config.base):
            named = {**{k: str(v) for k, v in bundled_controlnets().items()}, **named}
        for name, path in named.items():  # loaded now: requests can only pick among these
            self.pipe.add_controlnet(name, load_control(path, unet=self.pipe.base.unet, dtype=self.pipe.dtype))
        self.sources = named  # name -> the file or folder it was loaded from (A1111's model hashes)
        self.base_path = base_path(config.base)
        self.generation = GenerationQueue(config.queue)
        self.detection = GenerationQueue(2 * config.queue)

    # ------------------------------------------------------------------ info

    def models(self) -> dict:
        native = self.pipe.native_size
        guidance, guidance_rescale = self.pipe.default_guidance()
        nets = []
        for name in self.pipe.controlnets:
            # the annotator whose maps a net was trained on, when its name says it (nano-canny -> canny)
            suggested = next((a for a in sorted(ANNOTATORS, key=len, reverse=True) if a in name.lower()), "")
            net = self.pipe.controlnets[name]
            kind = kind_name(net)
            nets.append({"name": name, "annotator": suggested, "kind": kind,
                         "types": list(net.type_names) if kind == "union" else []})
        c = self.config
        return {"base": self.pipe.name, "controlnets": nets, "schedulers": list(SCHEDULERS),
                "modes": list(CONTROL_MODES), "resize_modes": list(RESIZE_MODES),
                "defaults": {"steps": 20, "guidance": guidance, "guidance_rescale": guidance_rescale,
                             "width": native, "height": native, "scheduler": "ddim"},
                "size_multiple": self.pipe.size_multiple,
                "limits": {"max_upload_mb": c.max_upload_mb, "max_pixels": c.max_pixels, "max_side": c.max_side,
                           "max_steps": c.max_steps, "max_images": c.max_images, "max_controls": c.max_controls,
                           "queue": c.queue}}

    @staticmethod
    def unavailable(name: str) -> str:
        """Why annotator ``name`` cannot run on this server ("" when it can), told without the
        server's paths: the package or weight file it lacks and where that is published."""
        if name in NEEDS and importlib.util.find_spec(NEEDS[name]) is None:
            return f"needs the {NEEDS[name]!r} package, not installed on this server"
        for need in WEIGHTS.get(name, ()):
            if locate_any(need) is None:
                w = options(need)[0]
                return (f"weights not found on this server: {w.describe()} (published at "
                        f"{', '.join('https://huggingface.co/' + r for r in w.repos)}; its operator puts it in "
                        f"$CTRLNET_ANNOTATORS or ~/.cache/ctrlnet/annotators)")
        return ""

    @classmethod
    def annotators(cls) -> list[dict]:
        out = []
        for name, fn in ANNOTATORS.items():
            # ``model`` (a path) is not offered: the server's weights are its operator's
            params = {p.name: p.default for p in inspect.signature(fn).parameters.values()
                      if p.name not in ("image", "model") and p.default is not inspect.Parameter.empty}
            doc = (inspect.getdoc(fn) or "").split("\n")[0]
            reason = cls.unavailable(name)
            out.append({"name": name, "doc": doc, "params": params, "available": not reason, "reason": reason,
                        "needs": NEEDS.get(name, "")})
        return out

    # ------------------------------------------------------------------ checks (before queueing)
    # Only what the server adds: its limits, the models it loaded, what it does not offer. The rules
    # of a control unit itself are Control.check()'s (see controls()), the ranges of the numbers
    # pipeline.ranges' (shared with the CLI and the Python API), the ranges of annotator parameters
    # get_annotator's.

    def check_params(self, annotator: str | None, params: dict, where: str) -> dict:
        """Every parameter within its annotator's declared range (``annotators.PARAMS``, whose upper
        ends keep one call on a 16 MP image within seconds), resolutions within this server's
        ``max_side`` too; parameters without an annotator are refused, not ignored."""
        if params and not annotator:
            raise ApiError(400, f"{where}: annotator parameters {sorted(params)} given but no annotator")
        if "model" in params:
            raise ApiError(400, f"{where}.params.model: the server takes no weight paths; the annotator uses the "
                                "weights its operator installed")
        if annotator and annotator != "inpaint":
            reason = self.unavailable(ALIASES.get(annotator, annotator)) if annotator in ANNOTATORS or \
                annotator in ALIASES else ""
            if reason:
                raise ApiError(400, f"{where}: annotator {annotator!r} is not available: {reason}")
            try:
                check_params(annotator, params)
            except (ValueError, TypeError) as e:
                raise ApiError(400, f"{where}: {e}") from None
        for key, v in params.items():
            if key in ("detect_resolution", "image_resolution"):
                if not (isinstance(v, int) and not isinstance(v, bool) and 64 <= v <= self.config.max_side):
                    raise ApiError(400, f"{where}.params.{key}: must be an integer in [64, {self.config.max_side}]")
        return params

    def fit(self, rgb):
        """An uploaded image scaled down, aspect kept, to at most ``max_side`` per side and
        ``max_pixels`` in all: detection and generation then work on no more than that (a 64x65536
        PNG is a few hundred bytes, and annotating it took minutes and gigabytes)."""
        c = self.config
        h, w = rgb.shape[:2]
        k = min(1.0, c.max_side / max(h, w), math.sqrt(c.max_pixels / (h * w)))
        return rgb if k >= 1 else resize_any(rgb, max(1, int(w * k)), max(1, int(h * k)))

    def check_resolutions(self, rgb, params: dict, where: str) -> None:
        """``detect_resolution`` / ``image_resolution`` set an image's short side; with the aspect of
        ``rgb`` its long side must stay within max_side as well (64x1024 at a short side of 1024
        would be 1024x16384). The size is the annotators' own (``resolution_size``: sides rounded to
        multiples of 64), so what is checked is what would run."""
        c = self.config
        h, w = rgb.shape[:2]
        for key in ("detect_resolution", "image_resolution"):
            if params.get(key) is not None:
                try:
                    sh, sw = resolution_size(h, w, params[key], where, key)
                except ValueError as e:
                    raise ApiError(400, f"{where}.params.{key}: {e}") from None
                if max(sh, sw) > c.max_side or sh * sw > c.max_pixels:
                    raise ApiError(400, f"{where}.params.{key}: {params[key]} on a {w}x{h} image makes a {sw}x{sh} "
                                        f"map, over this server's limit of {c.max_side} px per side and "
                                        f"{c.max_pixels:,} pixels")

    def check_generate(self, req: GenerateRequest) -> None:
        c = self.config
        if req.steps > c.max_steps:
            raise ApiError(400, f"steps: {req.steps} is over this server's limit of {c.max_steps}")
        if req.num_images > c.max_images:
            raise ApiError(400, f"num_images: {req.num_images} is over this server's limit of {c.max_images}")
        for key in ("width", "height"):
            v = getattr(req, key)
            if v is not None and v > c.max_side:
                raise ApiError(400, f"{key}: {v} is over this server's limit of {c.max_side}")
        try:  # the ranges the CLI and the Python API check (the schema's bounds come from the same table)
            check_args(steps=req.steps, num_images=req.num_images, guidance=req.guidance,
                       guidance_rescale=req.guidance_rescale, width=req.width, height=req.height)
            check_seed(req.seed, req.num_images)
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        if len(req.controls) > c.max_controls:
            raise ApiError(400, f"controls: {len(req.controls)} units, this server allows {c.max_controls}")
        try:  # the Pipeline's own normaliser: the same spellings are accepted
            scheduler_key(req.scheduler)
        except ValueError as e:
            raise ApiError(400, f"scheduler: {e}") from None
        for i, u in enumerate(req.controls):
            if u.model not in self.pipe.controlnets:
                raise ApiError(400, f"controls.{i}.model: unknown ControlNet {u.model!r}; available: "
                                    f"{', '.join(self.pipe.controlnets) or 'none'}")
            if u.annotator == "inpaint":  # needs an init image and a mask, which the API does not take
                raise ApiError(400, f"controls.{i}.annotator: inpaint is not offered by the server")
            self.check_params(u.annotator, u.params, f"controls.{i}")

    def controls(self, req: GenerateRequest, images: list, pair_images: list | None = None) -> list[Control]:
        """The request's units as Controls with their decoded images (after ``fit``; a Union unit's
        pairs' images in ``pair_images``), each checked by Control.check() now, so a bad unit is a 400
        before it waits in the queue."""
        out = []
        pair_images = pair_images or [[] for _ in images]
        for i, (unit, image, more) in enumerate(zip(req.controls, images, pair_images, strict=True)):
            self.check_resolutions(image, unit.params, f"controls.{i}")
            out.append(self.checked(unit.to_control(image, more), f"controls.{i}"))
        return out

    def checked(self, control: Control, where: str) -> Control:
        """``control`` after Control.check() and its net's weight check: a 400 naming ``where``."""
        try:
            control.check()
            self.pipe.check_unit(control)  # its kind's rules, a weight per residual or one for all
        except (WeightsError, WeightsNotFound) as e:
            raise ApiError(400, f"{where}: " + weights_problem(control.annotator, e)) from None
        except (ValueError, TypeError) as e:  # TypeError: get_annotator given a parameter of the wrong kind
            raise ApiError(400, f"{where}: {e}") from None
        return control

    def sized(self, req: GenerateRequest, images: list) -> GenerateRequest:
        """``req`` with its width and height resolved as the Pipeline resolves them (missing sides
        follow the first control image's aspect), within max_side and max_pixels: a size derived
        from an image is scaled down to fit, aspect kept; one the request gave and that does not
        fit (after rounding to the model's multiple) is a 400."""
        c = self.config
        try:
            w, h = self.pipe.output_size(req.width, req.height, images[0] if images else None, c.max_side,
                                         c.max_pixels)
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        return req.model_copy(update={"width": w, "height": h})

    # ------------------------------------------------------------------ work (runs in a worker thread)

    def detect(self, rgb, annotator: str, params: dict) -> dict:
        t0 = time.perf_counter()
        try:
            fn = get_annotator(annotator, **params)
            out = fn(rgb)  # rgb: already within the server's caps (fit, check_resolutions)
        except (WeightsError, WeightsNotFound) as e:
            raise ApiError(400, weights_problem(annotator, e)) from None
        except (ValueError, TypeError) as e:  # the annotators' own errors name the annotator; say it once
            message = str(e) if repr(annotator) in str(e) else f"annotator {annotator!r}: {e}"
            raise ApiError(400, message) from None
        return {"image": data_url(png_bytes(out)), "width": int(out.shape[1]), "height": int(out.shape[0]),
                "seconds": round(time.perf_counter() - t0, 3)}

    def run_pipeline(self, kwargs: dict):
        """(Pipeline result, the prompt-truncation warnings to pass on) of ``self.pipe(**kwargs)``,
        run on the model thread; a 400 for what the pipeline refuses once the model is there."""
        def work():  # on the model thread; its warnings are caught there
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = self.pipe(**kwargs)
            return result, [str(w.message) for w in caught if issubclass(w.category, PromptTruncatedWarning)]
        try:
            return self.model_thread.submit(work).result()
        except (WeightsError, WeightsNotFound) as e:
            raise ApiError(400, weights_problem("", e)) from None
        except ValueError as e:  # the pipeline's own checks that need the model: image sizes, ...
            raise ApiError(400, str(e)) from None

    def generate(self, req: GenerateRequest, controls: list[Control], on_step=None, stop=None) -> dict:
        """Run the Pipeline on the model thread; ``controls`` from ``controls()``, ``req`` from
        ``sized()`` (so width and height are set)."""
        t0 = time.perf_counter()
        result, notes = self.run_pipeline(dict(
            prompt=req.prompt, controls=controls, negative_prompt=req.negative_prompt, steps=req.steps,
            guidance=req.guidance, guidance_rescale=req.guidance_rescale, seed=req.seed, num_images=req.num_images,
            width=req.width, height=req.height, scheduler=req.scheduler, callback=on_step, stop=stop))
        w, h = result.images[0].size
        return {"images": [data_url(png_bytes(im, p)) for im, p in zip(result.images, result.parameters)],
                "conditions": [data_url(png_bytes(x)) for m in result.conditions  # a Union unit's pairs: each
                               for x in (m if isinstance(m, tuple) else [m])],
                "parameters": result.parameters, "seeds": result.seeds,
                "width": w, "height": h, "seconds": round(time.perf_counter() - t0, 3), "warnings": notes}

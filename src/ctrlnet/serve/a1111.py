"""AUTOMATIC1111's web UI API (``/sdapi/v1/*``, with the ControlNet extension's units and
``/controlnet/*``) over the same ``Server``: its requests become our Pipeline's arguments, our
results its responses. No HTTP here (``app`` routes to it), so each step can be called directly.

What is A1111's here: the field names and defaults (``steps`` 50, ``cfg_scale`` 7, ``seed`` -1,
``sampler_index`` "Euler"), unknown fields ignored, ``batch_size`` x ``n_iter`` images with seeds
seed + i, the response ``{images: [base64 PNG], parameters: <request echo>, info: <JSON string>}``
and the detected maps after the images. What is ours: width/height default to the base's native
size (512 for SD1.5, A1111's default; 1024 for SDXL), and what the server does not do (hires fix,
face restoration, tiling, styles, variation seeds, selectable scripts, unit masks) is a 4xx naming
the field rather than silently ignored. The server's limits and checks are the ``Server``'s.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pydantic
from PIL import Image, ImageOps
from pydantic import ConfigDict

from ..annotators import resolution_size
from ..images import png_bytes, resize_photo, resize_plain, resize_to
from ..formats import kind_name
from ..pipeline import Control
from ..pipeline.ranges import check_args, resolve_seed
from ..pipeline.schedulers import SCHEDULERS, scheduler_key
from ..version import __version__
from . import extension
from .server import ApiError, Server
from .uploads import UploadError, decode_base64, decode_image

# A1111's sampler names (and their aliases) -> our sampler; DPM++ 2M's automatic schedule is Karras
SAMPLERS = {"DPM++ 2M": ("dpmpp_2m_karras", ["k_dpmpp_2m"], {"scheduler": "karras"}),
            "Euler a": ("euler_a", ["k_euler_a", "k_euler_ancestral"], {"uses_ensd": "True"}),
            "Euler": ("euler", ["k_euler"], {}),
            "DDIM": ("ddim", ["ddim"], {}),
            "PLMS": ("pndm", ["plms"], {}),
            "UniPC": ("unipc", ["unipc"], {}),
            "DDPM": ("ddpm", ["ddpm"], {})}
SCHEDULES = {"automatic": "Automatic", "karras": "Karras", "uniform": "Uniform"}
SCHEDULE_TYPE = {"dpmpp_2m_karras": "Karras", "dpmpp_2m": "Uniform"}  # info's "Schedule type", as A1111 1.9+
SCRIPTS = ["controlnet", "controlnet m2m"]  # webuiapi turns its ControlNet support on when it sees "controlnet m2m"
MAX_OPTIONS = 256  # options kept from POST /options (echoed to every client)


class Txt2ImgRequest(pydantic.BaseModel):
    """A1111's fields, all optional (clients send null for many); unknown ones ignored."""
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, protected_namespaces=())
    prompt: str | None = ""
    negative_prompt: str | None = ""
    styles: list[str] | None = None
    seed: int | None = -1
    subseed: int | None = -1
    subseed_strength: float | None = 0
    seed_resize_from_h: int | None = -1
    seed_resize_from_w: int | None = -1
    sampler_name: str | None = None
    sampler_index: str | None = "Euler"
    scheduler: str | None = None
    batch_size: int | None = 1
    n_iter: int | None = 1
    steps: int | None = 50
    cfg_scale: float | None = 7.0
    width: int | None = None      # A1111: 512; here the base's native size (512 for SD1.5)
    height: int | None = None
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool | None = False
    do_not_save_grid: bool | None = False
    eta: float | None = None
    denoising_strength: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool | None = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool | None = False
    comments: dict | None = None
    enable_hr: bool | None = False
    firstphase_width: int | None = 0
    firstphase_height: int | None = 0
    hr_scale: float | None = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int | None = 0
    hr_resize_x: int | None = 0
    hr_resize_y: int | None = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str | None = ""
    hr_negative_prompt: str | None = ""
    force_task_id: str | None = None
    script_name: str | None = None
    script_args: list | None = []
    send_images: bool | None = True
    save_images: bool | None = False
    alwayson_scripts: dict[str, Any] | None = {}
    infotext: str | None = None


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] | None = None
    resize_mode: int | None = 0
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int | None = 4
    mask_blur_y: int | None = 4
    mask_blur: int | None = None
    mask_round: bool | None = True
    inpainting_fill: int | None = 0
    inpaint_full_res: bool | None = True
    inpaint_full_res_padding: int | None = 0
    inpainting_mask_invert: int | None = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    denoising_strength: float | None = 0.75
    include_init_images: bool | None = False


@dataclass
class Job:
    """A checked txt2img/img2img request, ready for the queue."""
    echo: dict                       # the request as A1111 echoes it in "parameters"
    prompt: str
    negative_prompt: str
    steps: int
    guidance: float
    scheduler: str                   # our key
    sampler_name: str                # A1111's, for "info"
    seed: int                        # resolved (-1 drawn here, so every iteration knows its seeds)
    batch_size: int
    n_iter: int
    width: int
    height: int
    controls: list[Control] = field(default_factory=list)
    save_maps: list[bool] = field(default_factory=list)
    init: np.ndarray | None = None   # (height, width, 3) uint8, already resized
    mask: np.ndarray | None = None   # (height, width, 3) uint8, white = repaint
    strength: float | None = None
    send_images: bool = True
    calls: int = 0                   # callbacks per iteration (the sampler's steps), for the progress


class A1111:
    """The A1111 API over one ``Server``."""

    def __init__(self, server: Server):
        self.server = server
        self._titles: dict[str, str] | None = None
        self._hash: str | None = None
        self.options_set: dict[str, Any] = {}  # what clients POSTed to /options (kept, echoed, not acted on)
        self.decoding = threading.Lock()  # one request's images decoded at a time (prepare)
        self.titles(), self.checkpoint()  # the files are hashed now, not on the event loop of a first request

    # ------------------------------------------------------------------ names

    def titles(self) -> dict[str, str]:
        """{"name [hash8]": name} of the offered ControlNets (the extension's model_list names)."""
        if self._titles is None:
            self._titles = {f"{name} [{extension.model_hash(path)}]": name
                            for name, path in sorted(self.server.sources.items())}
        return self._titles

    def checkpoint(self) -> dict:
        """The loaded base as an /sd-models entry; its title is what sd_model_checkpoint must name."""
        if self._hash is None:
            try:
                self._hash = extension.model_hash(self.server.base_path)
            except OSError:  # a Pipeline handed to the Server, not loaded from config.base
                self._hash = "00000000"

        name = self.server.pipe.name
        return {"title": f"{name} [{self._hash}]", "model_name": name, "hash": self._hash, "sha256": None,
                "filename": name, "config": None}

    def check_checkpoint(self, name: Any, where: str) -> None:
        entry = self.checkpoint()
        ok = isinstance(name, str) and name.strip() in (entry["title"], entry["model_name"], entry["hash"]) or \
            (isinstance(name, str) and name.split(" [")[0].strip() == entry["model_name"])
        if not ok:
            raise ApiError(400, f"{where}: {name!r} is not loaded; this server serves one base: {entry['title']!r} "
                                "(restart ctrlnet serve with --base to serve another)")

    # ------------------------------------------------------------------ lists

    @staticmethod
    def samplers() -> list[dict]:
        return [{"name": name, "aliases": aliases, "options": options}
                for name, (_, aliases, options) in SAMPLERS.items()]

    @staticmethod
    def schedulers() -> list[dict]:
        return [{"name": k, "label": v, "aliases": None, "default_rho": 7.0 if k == "karras" else -1.0,
                 "need_inner_model": False} for k, v in SCHEDULES.items()]

    def options(self) -> dict:
        entry = self.checkpoint()
        return {**self.options_set, "sd_model_checkpoint": entry["title"], "sd_checkpoint_hash": entry["sha256"],
                "sd_vae": "Automatic", "CLIP_stop_at_last_layers": 1, "samples_format": "png",
                "control_net_unit_count": self.server.config.max_controls}

    def set_options(self, body: Any) -> None:
        """``sd_model_checkpoint`` must name the loaded base; other options (clients set their UI's:
        samples_format, live previews, ...) are kept and echoed by GET, not acted on - scalars only,
        and a bounded number, since every later client receives them."""
        if not isinstance(body, dict):
            raise ApiError(400, "options: body must be a JSON object of option names and values")
        if "sd_model_checkpoint" in body:
            self.check_checkpoint(body["sd_model_checkpoint"], "sd_model_checkpoint")
        rest = {k: v for k, v in body.items() if k != "sd_model_checkpoint"}
        for k, v in rest.items():
            if len(k) > 100 or not (v is None or isinstance(v, (bool, int, float)) or
                                    (isinstance(v, str) and len(v) <= 1000)):
                raise ApiError(400, f"options.{k[:100]}: only names up to 100 characters with a number, true/false "
                                    "or a string up to 1000 characters are kept")
        if len(set(self.options_set) | set(rest)) > MAX_OPTIONS:
            raise ApiError(400, f"options: at most {MAX_OPTIONS} options are kept")
        self.options_set.update(rest)

    def progress(self) -> dict:
        q = self.server.generation
        s = q.status()
        running = s["running"]
        frac = s["step"] / s["total"] if running and s["total"] else 0.0
        elapsed = time.perf_counter() - q.started if running else 0.0
        return {"progress": round(frac, 4), "eta_relative": round(elapsed / frac - elapsed, 2) if frac else 0.0,
                "state": {"skipped": False, "interrupted": q.interrupted(), "stopping_generation": False,
                          "job": "scripts_txt2img" if running else "", "job_count": int(running) + s["queued"],
                          "job_timestamp": "0", "job_no": 0, "sampling_step": s["step"] if running else 0,
                          "sampling_steps": s["total"] if running else 0},
                "current_image": None, "textinfo": None}

    def model_list(self) -> dict:
        return {"model_list": list(self.titles())}

    def modules(self) -> dict:
        """Label -> Module of the modules this server can run (those whose detector weights are missing left out)."""
        return {label: m for label, m in extension.all_modules().items()
                if m.annotator in ("", "inpaint") or not self.server.unavailable(m.annotator)}

    def module_list(self, alias_names: bool) -> dict:
        name = (lambda label: label) if alias_names else (lambda label: extension.NAMES.get(label, label))
        modules = self.modules()
        return {"module_list": [name(label) for label in modules],
                "module_detail": {name(label): extension.module_detail(m) for label, m in modules.items()}}

    def control_types(self) -> dict:
        modules, titles = self.modules(), list(self.titles())
        types = {"All": {"module_list": list(modules), "model_list": ["None", *titles], "default_option": "none",
                         "default_model": "None"}}
        for tag in sorted({m.tag for m in modules.values() if m.tag}):
            labels = ["none", *[label for label, m in modules.items() if m.tag == tag]]
            models = ["None", *[t for t in titles if tag.lower().replace("normalmap", "normal")
                                .replace("segmentation", "seg") in t.lower()]]
            types[tag] = {"module_list": labels, "model_list": models, "default_option": labels[1],
                          "default_model": models[1] if len(models) > 1 else "None"}
        return {"control_types": types}

    def settings(self) -> dict:
        n = self.server.config.max_controls
        return {"control_net_unit_count": n, "control_net_max_models_num": n}

    # ------------------------------------------------------------------ checks (before queueing)

    @staticmethod
    def _bytes(data: Any, where: str) -> bytes:
        """The bytes of a base64 string or data URL (line breaks tolerated, as A1111's decoder does)."""
        if not isinstance(data, str):
            raise ApiError(400, f"{where}: expected a base64 string or data URL")
        head, sep, body = data.partition(",") if data.startswith("data:") else ("", "", data)
        try:
            return decode_base64(head + sep + "".join(body.split()), where)
        except UploadError as e:
            raise ApiError(e.status, str(e)) from None

    def image(self, data: str, where: str) -> np.ndarray:
        """(H, W, 3) uint8 of a base64 string or data URL, within the server's pixel cap, scaled down
        to its max_side."""
        try:
            return self.server.fit(decode_image(self._bytes(data, where), where, self.server.config.max_pixels))
        except UploadError as e:
            raise ApiError(e.status, str(e)) from None

    def mask(self, data: str, where: str) -> np.ndarray:
        """(H, W, 3) uint8 inpainting mask, white = repaint, read as A1111 reads it: the alpha channel
        where it varies (opaque = repaint), else the greyscale (L) of the colours."""
        rgb = self.image(data, where)
        try:
            with Image.open(io.BytesIO(self._bytes(data, where))) as im:
                im = ImageOps.exif_transpose(im)
                alpha = np.asarray(im.getchannel("A")) if "A" in im.getbands() else None
        except (OSError, ValueError):
            alpha = None  # decoded above, so only an odd alpha channel gets here: use the colours
        if alpha is not None and alpha.min() != alpha.max():
            grey = np.where(alpha > 128, 255, 0).astype(np.uint8)
            grey = self.server.fit(np.repeat(grey[:, :, None], 3, 2))[..., 0]
        else:
            grey = np.asarray(Image.fromarray(rgb).convert("L"))
        return np.repeat(grey[:, :, None], 3, 2)

    def fit_resolution(self, rgb: np.ndarray, params: dict) -> dict:
        """``params`` with a ``detect_resolution`` (the unit's processor_res, 512 by default in
        clients) lowered in steps of 64 until the map it makes fits the server's caps: a 3:1 photo
        at 512 would need a 1536 px map."""
        res = params.get("detect_resolution")
        if res is None:
            return params
        h, w = rgb.shape[:2]
        c = self.server.config
        while res > 64:
            sh, sw = resolution_size(h, w, res, "unit", "detect_resolution")
            if max(sh, sw) <= c.max_side and sh * sw <= c.max_pixels:
                break
            res -= 64
        return {**params, "detect_resolution": res}

    def prepare(self, req: Txt2ImgRequest) -> Job:
        """Every check, before the queue: 4xx naming the field for what this server cannot do or
        what is over its limits. One request at a time decodes its images (each may be 16 MP), so
        a burst that the queue will refuse cannot hold many decoded images at once."""
        with self.decoding:
            return self._prepare(req)

    def _prepare(self, req: Txt2ImgRequest) -> Job:
        s, c = self.server, self.server.config
        img2img = isinstance(req, Img2ImgRequest)
        refused = [(req.enable_hr, "enable_hr: hires fix"), (req.restore_faces, "restore_faces: face restoration"),
                   (req.tiling, "tiling: tiling"), (req.styles, "styles: prompt styles"),
                   ((req.subseed_strength or 0) > 0, "subseed_strength: variation seeds"),
                   (req.refiner_checkpoint, "refiner_checkpoint: a refiner"),
                   (req.script_name, f"script_name: the script {req.script_name!r}")]
        for on, what in refused:
            if on:
                raise ApiError(422 if "script" in what else 400, f"{what} is not offered by ctrlnet serve")
        for key, value in (req.override_settings or {}).items():
            if key == "sd_model_checkpoint":
                self.check_checkpoint(value, "override_settings.sd_model_checkpoint")
        batch, n_iter = _positive(req.batch_size, 1, "batch_size"), _positive(req.n_iter, 1, "n_iter")
        steps = req.steps if req.steps is not None else 50
        if batch * n_iter > c.max_images:
            raise ApiError(400, f"batch_size x n_iter: {batch} x {n_iter} images, over this server's limit of "
                                f"{c.max_images}")
        if steps > c.max_steps:
            raise ApiError(400, f"steps: {steps} is over this server's limit of {c.max_steps}")
        for key in ("width", "height"):
            v = getattr(req, key)
            if v is not None and v > c.max_side:
                raise ApiError(400, f"{key}: {v} is over this server's limit of {c.max_side}")
        guidance = req.cfg_scale if req.cfg_scale is not None else 7.0
        strength = (req.denoising_strength if req.denoising_strength is not None else 0.75) if img2img else None
        try:
            check_args(steps=steps, num_images=batch * n_iter, guidance=guidance, width=req.width,
                       height=req.height, **({"strength": strength} if img2img else {}))
            seed = resolve_seed(-1 if req.seed is None else req.seed, batch * n_iter)
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        sampler_name, scheduler = self.sampler(req.sampler_name or req.sampler_index or "Euler", req.scheduler)
        units = self.units(req.alwayson_scripts)
        init = mask = None
        if img2img:
            if not req.init_images:
                raise ApiError(400, "init_images: img2img needs one init image")
            if len(req.init_images) > 1:
                raise ApiError(400, f"init_images: {len(req.init_images)} given; one init image per request here")
            init = self.image(req.init_images[0], "init_images[0]")
            if req.mask:
                mask = self.mask(req.mask, "mask")
        where = {u.index: f"alwayson_scripts.controlnet.args[{u.index}]" for u in units}
        images = {u.index: self.image(u.image, f"{where[u.index]}.image") for u in units if u.image is not None}
        ref = init if init is not None else next(iter(images.values()), None)
        try:
            width, height = s.pipe.output_size(req.width, req.height, ref, c.max_side, c.max_pixels)
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        try:
            mode = extension.resize_mode(req.resize_mode or 0, "resize_mode") if img2img else "crop_and_resize"
        except ValueError as e:
            raise ApiError(422, str(e)) from None
        if init is not None:  # brought to the output size by img2img's resize mode, as A1111 does
            init_full = init
            init = resize_to(init, width, height, mode, resize_photo)
            if mask is not None:
                mask = resize_to(mask, width, height, mode, resize_plain)
                if req.inpainting_mask_invert:
                    mask = 255 - mask
        controls, save = [], []
        for u in units:
            w = where[u.index]
            if u.annotator == "inpaint" and mask is None:
                raise ApiError(400, f"{w}.module: {u.label} needs img2img with a mask")
            if u.image is not None:
                rgb, resize = images[u.index], u.resize_mode
            elif init is not None:  # img2img: the unit works on the init image, with img2img's resize mode
                rgb, resize = init_full, mode
            else:
                raise ApiError(400, f"{w}.image: no image (txt2img units need one; in img2img the init image is "
                                    "used)")
            params = self.fit_resolution(rgb, u.params)
            s.check_params(u.annotator, params, w)
            s.check_resolutions(rgb, params, w)
            control = Control(model=u.model, image=rgb if u.annotator != "inpaint" else None,
                              annotator=u.annotator, annotator_params=params, scale=u.scale, start=u.start,
                              end=u.end, mode=u.mode, resize_mode=resize,
                              type=u.type if kind_name(s.pipe.controlnets[u.model]) == "union" else "")
            controls.append(s.checked(control, w))
            save.append(u.save_detected_map)
        # the sampler's own count of steps (img2img runs strength x steps; PLMS one more): the progress
        calls = len(s.pipe.prepare_timesteps(scheduler, steps, strength or 1.0, init is not None)[1])
        echo = req.model_dump()
        if img2img and not req.include_init_images:
            echo.update(init_images=None, mask=None)
        try:  # it goes back in the response: JSON that nests too deeply fails here, not after the work
            json.dumps(echo)
        except (RecursionError, ValueError):
            raise ApiError(400, "request: nested too deeply to echo back") from None
        return Job(echo=echo, prompt=req.prompt or "", negative_prompt=req.negative_prompt or "", steps=steps,
                   guidance=guidance, scheduler=scheduler, sampler_name=sampler_name, seed=seed, batch_size=batch,
                   n_iter=n_iter, width=width, height=height, controls=controls, save_maps=save, init=init,
                   mask=mask, strength=strength, send_images=req.send_images is not False, calls=calls)

    @staticmethod
    def sampler(name: str, schedule: str | None) -> tuple[str, str]:
        """(A1111 sampler name, our scheduler key) of a sampler name (a " Karras" suffix or the
        ``scheduler`` field choosing the schedule, as A1111 1.9+), or one of our own names.
        Schedules: automatic (the sampler's own: Karras for DPM++ 2M), karras (DPM++ 2M only),
        uniform (the plain one)."""
        schedule = (schedule or "automatic").strip().lower()
        names = {n.lower(): n for n in SAMPLERS} | {a: n for n, (_, aliases, _) in SAMPLERS.items() for a in aliases}
        name = name.strip()
        for suffix in SCHEDULES:  # "DPM++ 2M Karras": A1111 1.9+ splits the schedule off the name
            head = name[:-len(suffix) - 1].lower()
            if name.lower().endswith(" " + suffix) and head in names:
                name, schedule = head, suffix if schedule == "automatic" else schedule
        if schedule not in SCHEDULES:
            raise ApiError(400, f"scheduler: {schedule!r} is not offered; available: {', '.join(SCHEDULES)}")
        label = names.get(name.lower())
        if label is not None:
            key = SAMPLERS[label][0]
        else:  # our own names ("dpmpp_2m", "euler-a", ...)
            try:
                key = scheduler_key(name)
            except ValueError:
                raise ApiError(400, f"sampler_name: unknown sampler {name!r}; available: "
                                    f"{', '.join(SAMPLERS)}") from None
            label = SCHEDULERS[key][2]
            if schedule == "automatic":  # our names say their schedule themselves
                return label, key
        dpmpp_2m = key in ("dpmpp_2m", "dpmpp_2m_karras")
        if schedule == "karras":
            if not dpmpp_2m:
                raise ApiError(400, f"scheduler: Karras is offered with DPM++ 2M only, not {label!r}")
            key = "dpmpp_2m_karras"
        elif schedule == "uniform" and dpmpp_2m:
            key = "dpmpp_2m"
        return SCHEDULERS[key][2].removesuffix(" Karras"), key

    def units(self, scripts: dict | None) -> list[extension.Unit]:
        """The enabled ControlNet units of ``alwayson_scripts``; another always-on script is a 422
        as in A1111 (an empty one - webuiapi's stale ``{"args": []}`` - is accepted)."""
        units = []
        for name, value in (scripts or {}).items():
            args = value.get("args") if isinstance(value, dict) else None
            if name.lower() != "controlnet":
                if args:
                    raise ApiError(422, f"alwayson_scripts: script {name!r} not found (this server has: controlnet)")
                continue
            if args:  # "controlnet" and "ControlNet" both given: the last with units wins, as in A1111
                try:
                    units = extension.units(args, self.titles(), f"alwayson_scripts.{name}.args")
                except ValueError as e:
                    raise ApiError(422, str(e)) from None
        if len(units) > self.server.config.max_controls:
            raise ApiError(400, f"alwayson_scripts.controlnet.args: {len(units)} enabled units, this server allows "
                                f"{self.server.config.max_controls}")
        return units

    # ------------------------------------------------------------------ work (in a worker thread)

    def run(self, job: Job, on_step=None, stop=None) -> dict:
        """n_iter Pipeline calls of batch_size images (image i: seed + i, as A1111), then the maps."""
        images, infotexts, maps = [], [], []
        for k in range(job.n_iter):
            if k and stop is not None and stop():
                break
            step = (lambda i, k=k: on_step(k * job.calls + i)) if on_step else None
            result = self.server.run_pipeline(dict(
                prompt=job.prompt, controls=job.controls, negative_prompt=job.negative_prompt, steps=job.steps,
                guidance=job.guidance, seed=job.seed + k * job.batch_size, num_images=job.batch_size,
                width=job.width, height=job.height, scheduler=job.scheduler, init_image=job.init,
                strength=job.strength if job.init is not None else 1.0, mask=job.mask, callback=step, stop=stop))[0]
            images += [png(im, p) for im, p in zip(result.images, result.parameters)]
            infotexts += result.parameters
            if k == 0:
                maps = [png(x) for m, keep in zip(result.conditions, job.save_maps) if keep
                        for x in (m if isinstance(m, tuple) else [m])]
        seeds = [job.seed + i for i in range(len(infotexts))]
        info = {"prompt": job.prompt, "all_prompts": [job.prompt] * len(seeds),
                "negative_prompt": job.negative_prompt, "all_negative_prompts": [job.negative_prompt] * len(seeds),
                "seed": job.seed, "all_seeds": seeds, "subseed": job.seed, "all_subseeds": seeds,
                "subseed_strength": 0, "width": job.width, "height": job.height, "sampler_name": job.sampler_name,
                "cfg_scale": job.guidance, "steps": job.steps, "batch_size": job.batch_size, "restore_faces": False,
                "face_restoration_model": None, "sd_model_name": self.server.pipe.name,
                "sd_model_hash": self.checkpoint()["hash"], "sd_vae_name": None, "sd_vae_hash": None,
                "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": job.strength,
                "extra_generation_params": {"Schedule type": SCHEDULE_TYPE.get(job.scheduler, "Automatic")},
                "index_of_first_image": 0, "infotexts": infotexts, "styles": [],
                "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": 1,
                "is_using_inpainting_conditioning": job.mask is not None and
                self.server.pipe.base.unet.config.in_channels == 9,
                "version": f"ctrlnet {__version__}"}
        return {"images": (images + maps) if job.send_images else [], "parameters": job.echo,
                "info": json.dumps(info)}

    # ------------------------------------------------------------------ /controlnet/detect

    def prepare_detect(self, body: Any) -> tuple[list[np.ndarray], str, dict]:
        """(images, annotator, parameters) of a /controlnet/detect body; webuiapi's
        ``controlnet_images`` is taken for ``controlnet_input_images``. One at a time, as ``prepare``."""
        with self.decoding:
            return self._prepare_detect(body)

    def _prepare_detect(self, body: Any) -> tuple[list[np.ndarray], str, dict]:
        if not isinstance(body, dict):
            raise ApiError(422, "body must be a JSON object")
        name = str(body.get("controlnet_module") or "none")
        found = extension.module(name)
        if found is None or found[0] not in self.modules():
            raise ApiError(422, f"controlnet_module: module {name!r} is not available; GET /controlnet/module_list "
                                "lists this server's")
        label, m = found
        if m.annotator == "inpaint":
            raise ApiError(422, f"controlnet_module: {label} needs an init image and a mask; it has no detect step")
        images = body.get("controlnet_input_images") or body.get("controlnet_images") or []
        if not isinstance(images, list) or not images:
            raise ApiError(422, "controlnet_input_images: no image selected")
        if len(images) > self.server.config.max_images:
            raise ApiError(400, f"controlnet_input_images: {len(images)} images, over this server's limit of "
                                f"{self.server.config.max_images}")
        rgbs = [self.image(b, f"controlnet_input_images[{i}]") for i, b in enumerate(images)]
        params = extension.annotator_params(m, body.get("controlnet_processor_res", 512),
                                            body.get("controlnet_threshold_a", -1),
                                            body.get("controlnet_threshold_b", -1), False)
        self.server.check_params(m.annotator, params, "detect")
        for rgb in rgbs:
            self.server.check_resolutions(rgb, params, "detect")
        return rgbs, m.annotator, params

    def detect(self, images: list[np.ndarray], annotator: str, params: dict) -> dict:
        """The maps at the detector's resolution (as the extension returns them), raw base64 PNG."""
        out = []
        for rgb in images:
            if not annotator:  # "none": the image itself
                out.append(png(rgb))
                continue
            p = dict(params)
            if "detect_resolution" in p:  # the map stays at the detection size, as the extension's does
                p["image_resolution"] = p["detect_resolution"]
            out.append(self.server.detect(rgb, annotator, p)["image"].split(",", 1)[1])
        return {"images": out, "info": "Success"}


def png(image, parameters: str | None = None) -> str:
    """Raw base64 PNG (A1111 sends no data: prefix; webuiapi decodes it as is)."""
    return base64.b64encode(png_bytes(image, parameters)).decode("ascii")


def _positive(v: int | None, default: int, key: str) -> int:
    v = default if v is None else v
    if v < 1:
        raise ApiError(400, f"{key}: must be at least 1, got {v}")
    return v

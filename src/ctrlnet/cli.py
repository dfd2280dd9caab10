"""The ``ctrlnet`` command: a thin layer that parses arguments and calls the Python API.

Errors are one line (``ctrlnet generate: error: ...``, exit code 2), argparse's included; numbers
are checked against ``pipeline.ranges`` as they are parsed, the same table the Python API and the
server check."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import warnings
from pathlib import Path

from PIL import Image

from .allocator import retain_freed_memory
from .annotators import ALIASES, ANNOTATORS, describe
from .annotators.batch import annotate
from .eval.report import evaluate
from .base import load_base
from .formats import CONVERSIONS, CheckpointError, convert_control, inspect_control, kind_of
from .images import save_png
from .names import controlnet_path
from .pipeline import Control, Pipeline, Region
from .pipeline.controlled import BACKENDS, DTYPES, grid
from .pipeline.ranges import RANGES, Range
from .pipeline.schedulers import SCHEDULERS
from .serve import ServeConfig, serve
from .testbed.shapes import generate
from .training import TrainingError, load_config, train
from .training.config import resolve_config_path


def cmd_convert(args) -> None:
    out = Path(args.out)
    if args.to == "original" and out.suffix not in (".safetensors", ".pth"):
        raise SystemExit(f"ctrlnet convert: --out {out} must end in .safetensors or .pth for --to original")
    kind = kind_of(args.src)
    unet = None
    if kind == "control_lora":
        if not args.base:
            raise ValueError(f"{args.src} is a Control-LoRA (deltas on a base's weights): give its base with --base "
                             "(nano, a diffusers folder or a single file)")
        unet = load_base(args.base, tokenizer=args.tokenizer).unet
    kind, written = convert_control(args.src, out, args.to, half=args.half, unet=unet)
    print(f"wrote {written} ({kind} -> {args.to}{', fp16' if args.half else ''})")


def cmd_inspect(args) -> None:
    print(json.dumps(inspect_control(args.path), indent=2))


def cmd_data_shapes(args) -> None:
    out = generate(args.out, args.n, seed=args.seed, size=args.size, fill50k=args.fill50k, workers=args.workers)
    print(f"wrote {args.n} ShapesWorld samples to {out}")


def cmd_train(args) -> None:
    config = load_config(resolve_config_path(args.config), args.set)
    out = train(config, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:  # once, also under torchrun / accelerate launch
        print(f"trained {config.network}: {out}")


CONTROL_KEYS = {"model", "image", "annotator", "scale", "start", "end", "mode", "resize", "every", "type"}
PAIRED_KEYS = ("image", "type", "annotator")  # repeated in one unit: a Union net's (image, type) pairs
CONTROL_SYNTAX = ("KEY=VALUE pairs separated by commas; a value holding commas goes in double or single quotes "
                  """(--control 'model=nano-canny,image="a,b.png"')""")


def split_control(spec: str) -> list[tuple[str, str]]:
    """``k=v,k2="v, 2"`` -> [(k, v), (k2, "v, 2")]. A value that starts with a quote runs to the
    same quote and keeps its commas and spaces; quotes elsewhere are plain characters (a path
    such as ``bob's.png`` needs none)."""
    pairs, i = [], 0
    while i <= len(spec):
        comma = spec.find(",", i)
        part = spec[i:comma if comma >= 0 else len(spec)]
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"--control {spec!r}: {part!r} is not key=value ({CONTROL_SYNTAX})")
        start = i + len(key) + 1 + (len(value) - len(value.lstrip()))  # where the value begins in spec
        quote = spec[start:start + 1]
        if quote in ("'", '"'):
            end = spec.find(quote, start + 1)
            if end < 0:
                raise ValueError(f"--control {spec!r}: the quote {quote} after {key.strip()}= is never closed")
            rest = spec[end + 1:].lstrip()
            if rest and not rest.startswith(","):
                raise ValueError(f"--control {spec!r}: {rest!r} follows the quoted value of {key.strip()}")
            pairs.append((key.strip(), spec[start + 1:end]))
            comma = spec.find(",", end + 1)
        else:
            pairs.append((key.strip(), value.strip()))
        if comma < 0:
            break
        i = comma + 1
    return pairs


def parse_control(spec: str, keys: set[str] = CONTROL_KEYS, aliases: dict[str, str] | None = None) -> Control:
    """``model=M,image=P[,annotator=A][,scale=S][,start=A][,end=B][,mode=M][,resize=R][,every=K]`` -> Control.
    Annotator parameters go as ``annotator.low=50``. A scale of several values: ``scale=0.5/1/...``.
    A value with commas in quotes: ``image="a,b.png"`` (``split_control``).
    ``aliases``: other key names for a field (eval's ``condition=COLUMN`` is its image)."""
    aliases = aliases or {}
    keys = keys | set(aliases)
    fields, params, paired = {}, {}, {}
    for key, value in split_control(spec):
        if key.startswith("annotator."):
            params.update(parse_params([f"{key.split('.', 1)[1]}={value}"]))
        elif key in keys:
            name = aliases.get(key, key)
            if name in fields and name not in PAIRED_KEYS:
                raise ValueError(f"--control {spec!r}: {key}= given twice (only image=, type= and annotator= repeat: "
                                 "a Union net's pairs)")
            paired.setdefault(name, []).append(value)
            fields[name] = value
        else:
            raise ValueError(f"--control {spec!r}: unknown key {key!r}; use {', '.join(sorted(keys))}")
    if "model" not in fields:
        raise ValueError(f"--control {spec!r}: model=NAME_OR_PATH is required")
    if len(paired.get("type", [])) > 1:  # several (image, type) pairs: lists, checked pairwise by Control.check
        fields["type"] = paired["type"]
        fields["image"] = paired.get("image", [])
        if len(paired.get("annotator", [])) > 1:
            fields["annotator"] = paired["annotator"]
    elif any(len(paired.get(k, [])) > 1 for k in PAIRED_KEYS):
        raise ValueError(f"--control {spec!r}: image= or annotator= repeats without several type= (repeat them "
                         "together for a Union net: image=a.png,type=canny,image=b.png,type=depth)")
    try:
        scale = [float(x) for x in fields.get("scale", "1").split("/")]
        return Control(model=fields["model"], image=fields.get("image"), annotator=fields.get("annotator", ""),
                       annotator_params=params, scale=scale[0] if len(scale) == 1 else scale,
                       start=float(fields.get("start", 0)), end=float(fields.get("end", 1)),
                       mode=fields.get("mode", "balanced"), resize_mode=fields.get("resize", "crop_and_resize"),
                       every=whole_number(fields.get("every", "1"), "every"), type=fields.get("type", ""))
    except ValueError as e:
        raise ValueError(f"--control {spec!r}: {e}") from None


def whole_number(text: str, key: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{key}={text}: expected a whole number") from None


PACKAGE = Path(__file__).resolve().parent  # the ctrlnet package


def is_ours(w: warnings.WarningMessage) -> bool:
    """A warning of ctrlnet's (fp16 / emulated bf16 on this CPU, a truncated prompt, ...), as opposed
    to third-party chatter (diffusers / transformers deprecations), which the CLI leaves out."""
    if not issubclass(w.category, UserWarning):  # DeprecationWarning, FutureWarning: library chatter
        return False
    return w.category.__module__.startswith("ctrlnet") or Path(w.filename).resolve().is_relative_to(PACKAGE)


@contextlib.contextmanager
def shown_warnings(command: str):
    """Print ctrlnet's own warnings raised inside as one line each, once, also when an error follows."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for message in dict.fromkeys(str(w.message) for w in caught if is_ours(w)):
                print(f"ctrlnet {command}: warning: {one_line(message)}", file=sys.stderr)


IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
OTHER_IMAGE_SUFFIXES = (".gif", ".bmp", ".tif", ".tiff", ".avif", ".heic")  # refused rather than made folders
EXIF_IFD, USER_COMMENT = 0x8769, 0x9286


def output_paths(out: Path, n: int) -> tuple[list[Path], Path]:
    """(paths of ``n`` images, path of the grid) for ``--out``: a file name with an image suffix
    (``x.jpg``; several images ``x-000.jpg``, ``x-001.jpg``, ...; grid ``x-grid.jpg``), or else a
    folder (``000.png``, ..., ``grid.png``)."""
    suffix = out.suffix.lower()
    if suffix in OTHER_IMAGE_SUFFIXES:
        raise ValueError(f"--out {out}: {suffix} is not a supported format; use {', '.join(IMAGE_FORMATS)} "
                         "or a folder")
    if suffix not in IMAGE_FORMATS:
        return [out / f"{i:03d}.png" for i in range(n)], out / "grid.png"
    if n == 1:
        return [out], out.with_name(f"{out.stem}-grid{out.suffix}")
    return [out.with_name(f"{out.stem}-{i:03d}{out.suffix}") for i in range(n)], \
        out.with_name(f"{out.stem}-grid{out.suffix}")


def save_image(image: Image.Image, path: Path, parameters: str) -> Path:
    """``image`` in the format of ``path``'s suffix, with the generation parameters where A1111 puts
    them: a PNG "parameters" text chunk; for JPEG / WebP the EXIF UserComment, encoded as A1111
    (piexif) writes it: "UNICODE\\0" + UTF-16 big-endian. (Its home would be ``ctrlnet.images``.)"""
    fmt = IMAGE_FORMATS[path.suffix.lower()]
    if fmt == "PNG":
        return save_png(image, path, parameters)
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    exif.get_ifd(EXIF_IFD)[USER_COMMENT] = b"UNICODE\0" + parameters.encode("utf-16-be")
    image.save(path, format=fmt, quality=95, exif=exif)
    return path


def cmd_generate(args) -> None:
    controls = [parse_control(s) for s in args.control]
    for c in controls:
        c.check()
    regions = [parse_region(r) for r in args.region]
    out_paths, grid_path = output_paths(Path(args.out), args.num_images)  # a bad --out fails before any work
    with shown_warnings("generate"):  # printed before the generation starts (it may be slow, as they say)
        pipe = Pipeline.from_pretrained(args.base, controlnets=[c.model for c in controls], dtype=args.dtype,
                                        tokenizer=args.tokenizer,
                                        packed_weights=False if args.no_packed_weights else None,
                                        compile=args.compile, backend=args.backend)
    with shown_warnings("generate"):
        result = pipe(args.prompt, controls=controls, negative_prompt=args.negative_prompt, steps=args.steps,
                      guidance=args.guidance, guidance_rescale=args.guidance_rescale, seed=args.seed,
                      num_images=args.num_images, width=args.width, height=args.height, scheduler=args.scheduler,
                      init_image=args.init_image, strength=args.strength, mask=args.mask, progress=True,
                      regions=regions)
    paths = [save_image(image, path, params) for image, path, params in
             zip(result.images, out_paths, result.parameters)]
    if args.grid:
        grid_path.parent.mkdir(parents=True, exist_ok=True)
        paths.append(grid(result, grid_path))
    if args.seed == -1:
        print(f"ctrlnet generate: seed -1 drew {result.seeds[0]} (image i: seed + i; in each image's parameters)",
              file=sys.stderr)
    print("\n".join(str(p) for p in paths))


def parse_region(text: str):
    """``MASK=PROMPT`` (the first "=" splits; the prompt may hold commas and "=") -> Region."""
    mask, sep, prompt = text.partition("=")
    if not sep or not mask or not prompt.strip():
        raise ValueError(f"--region {text!r}: expected MASK.png=PROMPT, e.g. --region left.png='a red circle'")
    if not Path(mask).is_file():
        raise ValueError(f"--region {text!r}: no such mask file")  # the spec names the file
    return Region(prompt.strip(), mask)


def parse_params(items: list[str]) -> dict:
    """``k=v`` strings -> dict; values are JSON when they parse (numbers, true/false), else strings."""
    params = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--param {item!r}: expected key=value")
        key, value = item.split("=", 1)
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def cmd_annotators(args) -> int:
    """Every annotator: parameters, weights (found where, or not), whether it can run here."""
    names = [ALIASES.get(n, n) for n in args.names] or sorted(ANNOTATORS)
    unknown = [n for n in names if n not in ANNOTATORS]
    if unknown:
        print(f"error: unknown annotator(s) {unknown}; available: {', '.join(sorted(ANNOTATORS))}", file=sys.stderr)
        return 2
    entries = [describe(n) for n in names]
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    for e in entries:
        state = "ready" if e["available"] else "unavailable"
        print(f"{e['name']}: {state} - {e['doc']}")
        for key, p in e["params"].items():
            print(f"    {key} = {json.dumps(p['default'])}  ({p['valid']})")
        for w in e["weights"]:
            print(f"    weights {w['file'] or w['repos'][0]}: " + (w["found"] or f"not found (published at "
                                                                     f"{', '.join(w['repos'])})"))
        if not e["available"] and not any(w["found"] is None for w in e["weights"]):
            print(f"    {e['reason']}")  # not a missing file (listed above): a package, a bad file
    ready = sum(e["available"] for e in entries)
    print(f"{ready} of {len(entries)} ready; weights are looked for in $CTRLNET_ANNOTATORS, "
          f"~/.cache/ctrlnet/annotators and the Hugging Face cache (never downloaded)")
    return 0


def cmd_annotate(args) -> int:
    report = annotate(args.annotator, args.inputs, args.out, parse_params(args.param), workers=args.workers,
                      dataset=args.dataset, captions=args.captions, force=args.force)
    replaced = f" ({len(report.replaced)} redone: made by another annotator or other parameters)" \
        if report.replaced else ""
    print(f"annotate {args.annotator}: {len(report.written)} written{replaced}, {len(report.skipped)} already done, "
          f"{len(report.failed)} failed -> {args.out}")
    if report.dataset:
        print(f"data set: {report.dataset}")
    for source, error in report.failed:
        print(f"  failed: {source}: {error}", file=sys.stderr)
    return 1 if report.failed else 0


def cmd_eval(args) -> None:
    # eval: the condition comes from the data (condition=COLUMN, or the annotator run on the target)
    controls = [parse_control(c, CONTROL_KEYS - {"image"}, {"condition": "image"}) for c in args.control]
    report = evaluate(args.base, controls, args.data, args.out, n=args.n,
                      seeds=args.seeds, steps=args.steps, guidance=args.guidance,
                      guidance_rescale=args.guidance_rescale, scheduler=args.scheduler, dtype=args.dtype,
                      baseline=not args.no_baseline, split_objects=args.split_objects, regions=args.regions,
                      compile=args.compile, tokenizer=args.tokenizer, backend=args.backend)
    print((Path(args.out) / "report.md").read_text())
    print(f"report: {Path(args.out) / 'report.json'} ({report['seconds']} s)")


def cmd_serve(args) -> None:
    nets = {}
    for spec in args.controlnet:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).stem if Path(spec).suffix else Path(spec).name, spec
        try:
            nets[name] = str(controlnet_path(path))  # a path, or a bundled name
        except ValueError as e:  # its message starts with the path; say it once
            raise ValueError(f"--controlnet {spec}: {str(e).removeprefix(f'{path}: ')}") from None
    serve(ServeConfig(host=args.host, port=args.port, base=args.base, controlnets=nets, dtype=args.dtype,
                      queue=args.queue, max_upload_mb=args.max_upload_mb, max_pixels=args.max_pixels,
                      max_side=args.max_side, max_steps=args.max_steps, max_images=args.max_images,
                      compile=args.compile, tokenizer=args.tokenizer, backend=args.backend,
                      api_auth=args.api_auth or os.environ.get("CTRLNET_API_AUTH") or None))


BACKEND_HELP = ("torch, or openvino (CPU; pip install 'ctrlnet[openvino]'): the UNet, ControlNets and VAE decoder "
                "run as OpenVINO models, converted once per weights and cached in ~/.cache/ctrlnet/openvino "
                "($CTRLNET_OPENVINO_CACHE); --dtype fp32 or bf16 is then OpenVINO's precision (see README)")
TOKENIZER_HELP = ("a single-file base's tokenizer folder (vocab.json + merges.txt, or tokenizer.json); default: "
                  "the CLIP tokenizer shipped with ctrlnet")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``ctrlnet generate: error: argument --steps: 0 is not an
    integer in [1, 1000]``, exit code 2) instead of the usage block; subcommands inherit it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def in_range(r: Range | str):
    """An argparse type: the text as an int or float within ``r`` (a ``RANGES`` name, or a Range)."""
    r = RANGES[r] if isinstance(r, str) else r

    def parse(text: str):
        try:
            value = int(text) if r.integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if r.integer else 'a number'}") from None
        if not r.contains(value):
            raise argparse.ArgumentTypeError(f"{text} is not {r.describe()}")
        return value
    return parse


COUNT = Range(1, 2 ** 31 - 1, integer=True)  # --n, --workers, ...: at least 1


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="ctrlnet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a ControlNet, Union ControlNet, Control-LoRA or T2I-Adapter between "
                       "its layouts (kind and input layout are detected)")
    p.add_argument("src", help="a folder or file of any kind and layout (ctrlnet inspect names them)")
    p.add_argument("--to", required=True, choices=sorted({t for ts in CONVERSIONS.values() for t in ts}),
                   help="; ".join(f"{k}: {' | '.join(v)}" for k, v in CONVERSIONS.items()) + " (a Control-LoRA to "
                        "diffusers/single/original: a full ControlNet, its deltas merged into --base's weights)")
    p.add_argument("--out", required=True, help="output folder (diffusers) or .safetensors/.pth file")
    p.add_argument("--base", default=None, help="a Control-LoRA's base (nano, a diffusers folder or a single file)")
    p.add_argument("--tokenizer", default=None, metavar="DIR", help=TOKENIZER_HELP)
    p.add_argument("--half", action="store_true", help="write fp16 weights")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("inspect", help="print what a control network file holds (its kind first), as JSON")
    p.add_argument("path", help="a ControlNet / Union / Control-LoRA / T2I-Adapter file or folder, a bundled name "
                                "(nano-canny) or a training checkpoint")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("train", help="train a ControlNet on a locked base (single process, or under accelerate launch)")
    p.add_argument("--config", required=True, help="YAML/TOML config file, or a shipped config name (nano-canny, ...)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--resume", default=None, metavar="latest|DIR", help="continue from the newest checkpoint of "
                   "output_dir, or from a checkpoint folder")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="generate images under control (bundled nano base and ControlNets by default)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--base", default="nano", help="nano (bundled), a diffusers folder or a single-file checkpoint")
    p.add_argument("--tokenizer", default=None, metavar="DIR", help=TOKENIZER_HELP)
    p.add_argument("--control", action="append", default=[], metavar="model=M,image=P[,annotator=A][,scale=S]"
                   "[,start=A][,end=B][,mode=balanced|prompt|control][,resize=crop_and_resize|just_resize|"
                   "resize_and_fill][,every=K][,type=T]", help="a control unit (repeatable: several nets, residuals "
                   f"summed): {CONTROL_SYNTAX}; M is any kind: a ControlNet, Union ControlNet, Control-LoRA (on "
                   f"--base) or T2I-Adapter; scale {RANGES['scale'].describe()} (or one per residual, separated "
                   "by /), start/end fractions of the steps in [0, 1]; every=K runs the net at every K-th step and "
                   "reuses its residuals in between; type=T a Union net's condition type (canny, depth, openpose, "
                   "...); repeat image=,type= for several pairs in one Union unit")
    p.add_argument("--steps", type=in_range("steps"), default=20, help=RANGES["steps"].describe())
    p.add_argument("--guidance", type=in_range("guidance"), default=None,
                   help=f"CFG scale, {RANGES['guidance'].describe()}; <= 1 turns CFG off (default: 2.5 for zero-SNR "
                        "bases, else 7.5)")
    p.add_argument("--guidance-rescale", type=in_range("guidance_rescale"), default=None,
                   help="guidance rescale in [0, 1] (default: 0.7 for zero-SNR bases such as nano, else 0)")
    p.add_argument("--scheduler", default="ddim", help=", ".join(SCHEDULERS))
    p.add_argument("--seed", type=in_range("seed"), default=0,
                   help="image i uses seed + i; -1: a random seed, printed and written into each image's parameters")
    p.add_argument("--num-images", type=in_range("num_images"), default=1, help=RANGES["num_images"].describe())
    p.add_argument("--width", type=in_range("width"), default=None,
                   help="rounded to the model's size multiple (default: from the first condition image's aspect, "
                        f"short side at the model's native size, at most {RANGES['width'].hi} px per side)")
    p.add_argument("--height", type=in_range("height"), default=None, help="as --width")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--backend", default="torch", choices=list(BACKENDS), help=BACKEND_HELP)
    p.add_argument("--no-packed-weights", action="store_true",
                   help="CPU fp32: PyTorch's plain convolution kernels instead of weights packed for the "
                        "denoising loop (slower; lower peak memory, see README)")
    p.add_argument("--compile", action="store_true",
                   help="run the UNet and ControlNets through torch.compile (on a GPU with CUDA graphs); the "
                        "first step compiles for minutes, so it pays off over many images (see README)")
    p.add_argument("--init-image", default=None, help="img2img / inpainting source image")
    p.add_argument("--strength", type=in_range("strength"), default=1.0,
                   help="img2img: the fraction of the steps that redo the init image, in (0, 1]")
    p.add_argument("--mask", default=None, help="inpainting mask (white = repaint)")
    p.add_argument("--region", action="append", default=[], metavar="MASK=PROMPT",
                   help="regional prompt: inside MASK (white) this prompt replaces the main one (repeatable)")
    p.add_argument("--grid", action="store_true", help="also write a grid of conditions and results: grid.png in "
                   "the folder, or x-grid.png next to --out x.png")
    p.add_argument("--out", default="outputs/generate",
                   help="a folder (000.png, 001.png, ...), or a file x.png / x.jpg / x.jpeg / x.webp: the format "
                        "follows the suffix, several images are x-000.png, x-001.png, ...; the parameters are in a "
                        "PNG text chunk or the JPEG / WebP EXIF UserComment")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("annotators", help="list the annotators: parameters, weights found or not, ready or not")
    p.add_argument("names", nargs="*", metavar="NAME", help="only these (default: all)")
    p.add_argument("--json", action="store_true", help="as JSON")
    p.set_defaults(func=cmd_annotators)

    p = sub.add_parser("annotate", help="condition maps from images (files or folders), in parallel")
    p.add_argument("--annotator", required=True, help="an annotator name (`ctrlnet annotators` lists them); "
                   "neural ones take their weights as --param model=PATH or find them offline")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="annotator parameter, also detect_resolution / image_resolution (repeatable)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files and/or folders")
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=in_range(COUNT), default=os.cpu_count() or 1)
    p.add_argument("--dataset", default="", choices=["", "fill50k", "imagefolder"],
                   help="also write a training set: prompt.json (fill50k) or metadata.jsonl (imagefolder)")
    p.add_argument("--captions", default=None, help="CSV (file_name,text) or JSONL captions; default: .txt sidecars")
    p.add_argument("--force", action="store_true",
                   help="redo every output (by default only those missing, older than their input, or made by "
                        "another annotator or other parameters are made)")
    p.set_defaults(func=cmd_annotate)

    p = sub.add_parser("eval", help="score how well generated images follow their conditions (JSON/Markdown report)")
    p.add_argument("--base", default="nano")
    p.add_argument("--tokenizer", default=None, metavar="DIR", help=TOKENIZER_HELP)
    p.add_argument("--control", action="append", required=True,
                   metavar="model=M[,annotator=A][,condition=COLUMN][,scale=S][,start=A][,end=B][,mode=M][,every=K]",
                   help="a ControlNet to evaluate, with generate's --control keys but image= (the condition "
                        "comes from the data; repeat: nets act together; a glob over checkpoints: a curve)")
    p.add_argument("--data", required=True, help="fill50k folder/prompt file, metadata.jsonl, or ShapesWorld folder")
    p.add_argument("--n", type=in_range(COUNT), default=200)
    p.add_argument("--seeds", type=in_range("num_images"), default=1, help="images per sample")
    p.add_argument("--steps", type=in_range("steps"), default=20)
    p.add_argument("--guidance", type=in_range("guidance"), default=None)
    p.add_argument("--guidance-rescale", type=in_range("guidance_rescale"), default=None)
    p.add_argument("--scheduler", default="ddim")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--backend", default="torch", choices=list(BACKENDS), help=BACKEND_HELP)
    p.add_argument("--no-baseline", action="store_true", help="skip the same prompts without control")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet and ControlNets (see generate --compile)")
    p.add_argument("--split-objects", action="store_true",
                   help="ShapesWorld: control k acts around object k only (e.g. canny one object, segmentation another)")
    p.add_argument("--regions", action="store_true",
                   help="ShapesWorld: controlled runs also get one regional prompt per object ('a red circle on a ... "
                        "background') inside its true mask (the baseline stays a plain prompt)")
    p.add_argument("--out", required=True, help="report folder")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("serve", help="a local web UI and JSON API (OpenAPI at /openapi.json) over generate/annotators")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default loopback only)")
    p.add_argument("--port", type=in_range(Range(0, 65535, integer=True)), default=7860, help="0: any free port")
    p.add_argument("--base", default="nano", help="base model: nano, a diffusers folder or a single file")
    p.add_argument("--tokenizer", default=None, metavar="DIR", help=TOKENIZER_HELP)
    p.add_argument("--controlnet", action="append", default=[], metavar="[NAME=]PATH",
                   help="a ControlNet file/folder to offer (repeatable); with base nano the bundled nets are offered too")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--backend", default="torch", choices=list(BACKENDS), help=BACKEND_HELP)
    p.add_argument("--queue", type=in_range(Range(0, 2 ** 31 - 1, integer=True)), default=4,
                   help="requests that may wait for the model; more get 503")
    p.add_argument("--max-upload-mb", type=in_range(Range(0, 2 ** 20, lo_open=True)), default=16.0,
                   help="request body limit")
    p.add_argument("--max-pixels", type=in_range(COUNT), default=4096 * 4096,
                   help="pixel limit per image: uploads larger are refused (413, before decoding); generated and "
                        "detected sizes, also those derived from an image's aspect, stay within it")
    p.add_argument("--max-side", type=in_range("width"), default=1024,
                   help="largest width/height of an image the server makes or works on (uploads are scaled down "
                        "to it, sizes derived from an image's aspect are scaled down to fit), and detect resolution")
    p.add_argument("--max-steps", type=in_range("steps"), default=100)
    p.add_argument("--max-images", type=in_range("num_images"), default=4, help="images per request")
    p.add_argument("--api-auth", default=None, metavar="USER:PASS[,USER:PASS]",
                   help="HTTP basic credentials every route asks for (A1111's --api-auth; default: $CTRLNET_API_AUTH); "
                        "required with a --host beyond loopback")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet and ControlNets (see generate --compile); each new image size, "
                        "batch, set of active nets, weight or control mode compiles once, for minutes, on the "
                        "request that meets it (past 8 such graphs a model runs uncompiled)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("data", help="make data sets")
    data = p.add_subparsers(dest="dataset", required=True)
    p = data.add_parser("shapes", help="ShapesWorld: flat shapes with captions, condition maps and exact metadata")
    p.add_argument("--n", type=in_range(COUNT), required=True, help="number of samples")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=in_range(Range(0, 2 ** 32 - 1, integer=True)), default=0)
    p.add_argument("--size", type=in_range(Range(16, 8192, integer=True)), default=128, help="image side in pixels")
    p.add_argument("--fill50k", action="store_true", help="the fill50k recipe: one circle, outline condition")
    p.add_argument("--workers", type=in_range(COUNT), default=None, help="processes (default: all cores, at most 8)")
    p.set_defaults(func=cmd_data_shapes)
    return parser


# Jobs that allocate the same tensors step after step on the main thread: keep freed memory for reuse
# (ctrlnet.allocator). `train` leaves it to the Trainer (its retain_cpu_memory setting); `serve` generates on
# its model thread, whose glibc arena keeps only part of what it frees (blocks of 64 MiB and more are mapped
# afresh each time), so it is not applied there (not measured on a whole generation).
RETAIN_MEMORY = ("generate", "eval")


ANSI = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[@-_])")  # CSI, OSC, 2-byte escapes


def one_line(message: str) -> str:
    """An error or warning as one plain line: terminal escape codes (colours some libraries and
    compilers put in their messages) removed, lines joined, and a path said twice at the start
    ("a.png: a.png: cannot decode") said once."""
    text = " ".join(line.strip() for line in ANSI.sub("", message).splitlines() if line.strip())
    return re.sub(r"^(\S[^:]*): \1: ", r"\1: ", text)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in RETAIN_MEMORY:
            retain_freed_memory()
        code = args.func(args)
    except (CheckpointError, ValueError, OSError, TrainingError) as e:  # user-facing: one line, no traceback
        print(f"ctrlnet {args.command}: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    return code or 0


if __name__ == "__main__":
    sys.exit(main())

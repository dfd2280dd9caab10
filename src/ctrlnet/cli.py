"""The ``ctrlnet`` command: a thin layer that parses arguments and calls the Python API."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from .allocator import retain_freed_memory
from .annotators.batch import annotate
from .eval.report import evaluate
from .formats import CheckpointError, inspect_checkpoint, load_controlnet, save_controlnet
from .images import save_png
from .names import controlnet_path
from .pipeline import Control, Pipeline, PromptTruncatedWarning, Region
from .pipeline.controlled import DTYPES, grid
from .pipeline.schedulers import SCHEDULERS
from .serve import ServeConfig, serve
from .testbed.shapes import generate
from .training import TrainingError, load_config, train
from .training.config import resolve_config_path


def cmd_convert(args) -> None:
    net = load_controlnet(args.src)
    out = Path(args.out)
    if args.to == "original" and out.suffix not in (".safetensors", ".pth"):
        raise SystemExit(f"ctrlnet convert: --out {out} must end in .safetensors or .pth for --to original")
    save_controlnet(net, out, format=args.to, half=args.half)
    print(f"wrote {out} ({args.to}{', fp16' if args.half else ''})")


def cmd_inspect(args) -> None:
    print(json.dumps(inspect_checkpoint(args.path), indent=2))


def cmd_data_shapes(args) -> None:
    out = generate(args.out, args.n, seed=args.seed, size=args.size, fill50k=args.fill50k, workers=args.workers)
    print(f"wrote {args.n} ShapesWorld samples to {out}")


def cmd_train(args) -> None:
    config = load_config(resolve_config_path(args.config), args.set)
    out = train(config, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:  # once, also under torchrun / accelerate launch
        print(f"trained ControlNet: {out}")


CONTROL_KEYS = {"model", "image", "annotator", "scale", "start", "end", "mode", "resize"}


def parse_control(spec: str, keys: set[str] = CONTROL_KEYS, aliases: dict[str, str] | None = None) -> Control:
    """``model=M,image=P[,annotator=A][,scale=S][,start=A][,end=B][,mode=M][,resize=R]`` -> Control.
    Annotator parameters go as ``annotator.low=50``. A scale of several values: ``scale=0.5/1/...``.
    ``aliases``: other key names for a field (eval's ``condition=COLUMN`` is its image)."""
    aliases = aliases or {}
    keys = keys | set(aliases)
    fields, params = {}, {}
    for part in spec.split(","):
        if "=" not in part:
            raise ValueError(f"--control {spec!r}: {part!r} is not key=value")
        key, value = (x.strip() for x in part.split("=", 1))
        if key.startswith("annotator."):
            params.update(parse_params([f"{key.split('.', 1)[1]}={value}"]))
        elif key in keys:
            fields[aliases.get(key, key)] = value
        else:
            raise ValueError(f"--control {spec!r}: unknown key {key!r}; use {', '.join(sorted(keys))}")
    if "model" not in fields:
        raise ValueError(f"--control {spec!r}: model=NAME_OR_PATH is required")
    try:
        scale = [float(x) for x in fields.get("scale", "1").split("/")]
        return Control(model=fields["model"], image=fields.get("image"), annotator=fields.get("annotator", ""),
                       annotator_params=params, scale=scale[0] if len(scale) == 1 else scale,
                       start=float(fields.get("start", 0)), end=float(fields.get("end", 1)),
                       mode=fields.get("mode", "balanced"), resize_mode=fields.get("resize", "crop_and_resize"))
    except ValueError as e:
        raise ValueError(f"--control {spec!r}: {e}") from None


def cmd_generate(args) -> None:
    controls = [parse_control(s) for s in args.control]
    for c in controls:
        c.check()
    regions = [parse_region(r) for r in args.region]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # library chatter; our own warnings are printed below
        pipe = Pipeline.from_pretrained(args.base, controlnets=[c.model for c in controls], dtype=args.dtype,
                                        packed_weights=False if args.no_packed_weights else None,
                                        compile=args.compile)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = pipe(args.prompt, controls=controls, negative_prompt=args.negative_prompt, steps=args.steps,
                      guidance=args.guidance, guidance_rescale=args.guidance_rescale, seed=args.seed,
                      num_images=args.num_images, width=args.width, height=args.height, scheduler=args.scheduler,
                      init_image=args.init_image, strength=args.strength, mask=args.mask, progress=True,
                      regions=regions)
    for w in caught:
        if issubclass(w.category, PromptTruncatedWarning):
            print(f"ctrlnet generate: warning: {w.message}", file=sys.stderr)
    out = Path(args.out)
    paths = []
    for i, (image, params) in enumerate(zip(result.images, result.parameters)):
        path = out if out.suffix == ".png" and len(result.images) == 1 else \
            (out.with_suffix("") if out.suffix == ".png" else out) / f"{i:03d}.png"
        paths.append(save_png(image, path, params))
    if args.grid:
        folder = paths[0].parent
        paths.append(grid(result, folder / "grid.png"))
    print("\n".join(str(p) for p in paths))


def parse_region(text: str):
    """``MASK=PROMPT`` (the first "=" splits; the prompt may hold commas and "=") -> Region."""
    mask, sep, prompt = text.partition("=")
    if not sep or not mask or not prompt.strip():
        raise ValueError(f"--region {text!r}: expected MASK.png=PROMPT, e.g. --region left.png='a red circle'")
    if not Path(mask).is_file():
        raise ValueError(f"--region {text!r}: mask file {mask} not found")
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


def cmd_annotate(args) -> int:
    report = annotate(args.annotator, args.inputs, args.out, parse_params(args.param), workers=args.workers,
                      dataset=args.dataset, captions=args.captions)
    print(f"annotate {args.annotator}: {len(report.written)} written, {len(report.skipped)} already done, "
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
                      compile=args.compile)
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
        except ValueError as e:
            raise ValueError(f"--controlnet {spec}: {e}") from None
    serve(ServeConfig(host=args.host, port=args.port, base=args.base, controlnets=nets, dtype=args.dtype,
                      queue=args.queue, max_upload_mb=args.max_upload_mb, max_pixels=args.max_pixels,
                      max_side=args.max_side, max_steps=args.max_steps, max_images=args.max_images,
                      compile=args.compile))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctrlnet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a ControlNet between formats (any input format is detected)")
    p.add_argument("src", help="diffusers folder, or original .pth/.safetensors file")
    p.add_argument("--to", required=True, choices=["diffusers", "original"])
    p.add_argument("--out", required=True, help="output folder (diffusers) or .safetensors/.pth file (original)")
    p.add_argument("--half", action="store_true", help="write fp16 weights")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("inspect", help="print what a ControlNet checkpoint holds, as JSON")
    p.add_argument("path")
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
    p.add_argument("--control", action="append", default=[], metavar="model=M,image=P[,annotator=A][,scale=S]"
                   "[,start=A][,end=B][,mode=balanced|prompt|control][,resize=crop_and_resize|just_resize|"
                   "resize_and_fill]", help="a control unit (repeatable: several ControlNets, residuals summed)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: 2.5 for zero-SNR bases, else 7.5)")
    p.add_argument("--guidance-rescale", type=float, default=None,
                   help="guidance rescale (default: 0.7 for zero-SNR bases such as nano, else 0)")
    p.add_argument("--scheduler", default="ddim", help=", ".join(SCHEDULERS))
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--no-packed-weights", action="store_true",
                   help="CPU fp32: PyTorch's plain convolution kernels instead of weights packed for the "
                        "denoising loop (slower; lower peak memory, see README)")
    p.add_argument("--compile", action="store_true",
                   help="run the UNet and ControlNets through torch.compile (on a GPU with CUDA graphs); the "
                        "first step compiles for minutes, so it pays off over many images (see README)")
    p.add_argument("--init-image", default=None, help="img2img / inpainting source image")
    p.add_argument("--strength", type=float, default=1.0, help="img2img: how much of the init image to redo")
    p.add_argument("--mask", default=None, help="inpainting mask (white = repaint)")
    p.add_argument("--region", action="append", default=[], metavar="MASK=PROMPT",
                   help="regional prompt: inside MASK (white) this prompt replaces the main one (repeatable)")
    p.add_argument("--grid", action="store_true", help="also write grid.png: conditions and results")
    p.add_argument("--out", default="outputs/generate", help="a folder, or a .png file for one image")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("annotate", help="condition maps from images (files or folders), in parallel")
    p.add_argument("--annotator", required=True, help="canny, scribble, softedge, lineart, threshold, invert, "
                   "shuffle, palette, colour_shuffle, tile, segmentation")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="annotator parameter, also detect_resolution / image_resolution (repeatable)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files and/or folders")
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--dataset", default="", choices=["", "fill50k", "imagefolder"],
                   help="also write a training set: prompt.json (fill50k) or metadata.jsonl (imagefolder)")
    p.add_argument("--captions", default=None, help="CSV (file_name,text) or JSONL captions; default: .txt sidecars")
    p.set_defaults(func=cmd_annotate)

    p = sub.add_parser("eval", help="score how well generated images follow their conditions (JSON/Markdown report)")
    p.add_argument("--base", default="nano")
    p.add_argument("--control", action="append", required=True,
                   metavar="model=M[,annotator=A][,condition=COLUMN][,scale=S][,start=A][,end=B][,mode=M]",
                   help="a ControlNet to evaluate, with generate's --control keys but image= (the condition "
                        "comes from the data; repeat: nets act together; a glob over checkpoints: a curve)")
    p.add_argument("--data", required=True, help="fill50k folder/prompt file, metadata.jsonl, or ShapesWorld folder")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seeds", type=int, default=1, help="images per sample")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--guidance-rescale", type=float, default=None)
    p.add_argument("--scheduler", default="ddim")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
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
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--base", default="nano", help="base model: nano, a diffusers folder or a single file")
    p.add_argument("--controlnet", action="append", default=[], metavar="[NAME=]PATH",
                   help="a ControlNet file/folder to offer (repeatable); with base nano the bundled nets are offered too")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--queue", type=int, default=4, help="requests that may wait for the model; more get 503")
    p.add_argument("--max-upload-mb", type=float, default=16.0, help="request body limit")
    p.add_argument("--max-pixels", type=int, default=4096 * 4096, help="pixel limit per uploaded image")
    p.add_argument("--max-side", type=int, default=1024, help="largest width/height (and detect resolution)")
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--max-images", type=int, default=4, help="images per request")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet and ControlNets (see generate --compile); each new image size, "
                        "batch, set of active nets, weight or control mode compiles once, for minutes, on the "
                        "request that meets it (past 8 such graphs a model runs uncompiled)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("data", help="make data sets")
    data = p.add_subparsers(dest="dataset", required=True)
    p = data.add_parser("shapes", help="ShapesWorld: flat shapes with captions, condition maps and exact metadata")
    p.add_argument("--n", type=int, required=True, help="number of samples")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p.add_argument("--fill50k", action="store_true", help="the fill50k recipe: one circle, outline condition")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores, at most 8)")
    p.set_defaults(func=cmd_data_shapes)
    return parser


# Jobs that allocate the same tensors step after step on the main thread: keep freed memory for reuse
# (ctrlnet.allocator). `train` leaves it to the Trainer (its retain_cpu_memory setting); `serve` generates on
# its model thread, whose glibc arena keeps only part of what it frees (blocks of 64 MiB and more are mapped
# afresh each time), so it is not applied there (not measured on a whole generation).
RETAIN_MEMORY = ("generate", "eval")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in RETAIN_MEMORY:
            retain_freed_memory()
        code = args.func(args)
    except (CheckpointError, ValueError, OSError, TrainingError) as e:  # user-facing: one line, no traceback
        print(f"ctrlnet {args.command}: error: {e}", file=sys.stderr)
        return 2
    return code or 0


if __name__ == "__main__":
    sys.exit(main())

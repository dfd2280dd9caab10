"""The ``ctrlnet`` command: a thin layer that parses arguments and calls the Python API."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def cmd_convert(args) -> None:
    from .formats import load_controlnet, save_controlnet
    net = load_controlnet(args.src)
    out = Path(args.out)
    if args.to == "original" and out.suffix not in (".safetensors", ".pth"):
        raise SystemExit(f"ctrlnet convert: --out {out} must end in .safetensors or .pth for --to original")
    save_controlnet(net, out, format=args.to, half=args.half)
    print(f"wrote {out} ({args.to}{', fp16' if args.half else ''})")


def cmd_inspect(args) -> None:
    from .formats import inspect_checkpoint
    print(json.dumps(inspect_checkpoint(args.path), indent=2))


def cmd_data_shapes(args) -> None:
    from .testbed.shapes import generate
    out = generate(args.out, args.n, seed=args.seed, size=args.size, fill50k=args.fill50k, workers=args.workers)
    print(f"wrote {args.n} ShapesWorld samples to {out}")


def cmd_train(args) -> None:
    from .training.config import load_config, resolve_config_path
    from .training.trainer import train
    config = load_config(resolve_config_path(args.config), args.set)
    out = train(config, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:  # once, also under torchrun / accelerate launch
        print(f"trained ControlNet: {out}")


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


def main(argv: list[str] | None = None) -> int:
    from .formats.safe_load import CheckpointError
    from .training.config import TrainingError
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (CheckpointError, ValueError, OSError, TrainingError) as e:  # user-facing: one line, no traceback
        print(f"ctrlnet {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

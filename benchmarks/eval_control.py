"""Controllability of a trained ControlNet on held-out ShapesWorld conditions (issue 5 figures).

    .venv/bin/python benchmarks/eval_control.py --controlnet runs/nano-canny/controlnet \\
        --data data/shapes-val/prompt_canny.json [--n 200] [--base nano]

For the first --n held-out samples: generate from (condition, caption) and score the image against
the target with ``ctrlnet.eval.control``: mask IoU (foreground vs target) and edge F1 (Canny of the
generated image vs Canny of the target, 1-pixel tolerance). The same prompts without control give
the floor. Prints a JSON report and a Markdown row.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from ctrlnet.base import load_base
from ctrlnet.eval.control import controllability
from ctrlnet.formats import load_controlnet
from ctrlnet.pipeline.text_to_image import text_to_image
from ctrlnet.training.data import ControlDataset, condition_to_tensor, read_records
from ctrlnet.training.trainer import resolve_base_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--controlnet", required=True)
    parser.add_argument("--data", required=True, help="held-out fill50k-format prompt file or folder")
    parser.add_argument("--base", default="nano")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=2.5)
    parser.add_argument("--guidance-rescale", type=float, default=0.7)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-baseline", action="store_true", help="skip the uncontrolled floor")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    base = load_base(resolve_base_path(args.base))
    net = load_controlnet(args.controlnet, dtype=torch.float32).eval()
    ds = ControlDataset(read_records(args.data)[:args.n], args.resolution)
    n = len(ds)
    targets = [ds.image(i) for i in range(n)]
    conds = [ds.condition(i) for i in range(n)]
    prompts = [ds.text(i) for i in range(n)]

    def run(control: bool) -> tuple[dict, float]:
        images, start = [], time.perf_counter()
        for s in range(0, n, 25):
            kw = dict(controlnets=[net], conditions=[condition_to_tensor(conds[s:s + 25])], scales=[args.scale]) \
                if control else {}
            images.append(text_to_image(base, prompts[s:s + 25], steps=args.steps, guidance=args.guidance,
                                        guidance_rescale=args.guidance_rescale, seed=args.seed + s,
                                        height=args.resolution, width=args.resolution, **kw))
        seconds = (time.perf_counter() - start) / n
        scores = [controllability(g, t) for g, t in zip(np.concatenate(images), targets)]
        return {k: round(float(np.mean([s[k] for s in scores])), 4) for k in ("iou", "edge_f1")}, seconds

    controlled, sec = run(True)
    report = {"controlnet": args.controlnet, "data": args.data, "n": n, "steps": args.steps,
              "guidance": args.guidance, "guidance_rescale": args.guidance_rescale, "scale": args.scale,
              "iou": controlled["iou"], "edge_f1": controlled["edge_f1"], "seconds_per_image": round(sec, 3)}
    if not args.no_baseline:
        floor, _ = run(False)
        report.update(iou_no_control=floor["iou"], edge_f1_no_control=floor["edge_f1"])
    print(json.dumps(report, indent=2))
    print(f"| {args.controlnet} | {n} | {report['iou']:.3f} | {report['edge_f1']:.3f} | "
          f"{report.get('iou_no_control', float('nan')):.3f} / {report.get('edge_f1_no_control', float('nan')):.3f} |")


if __name__ == "__main__":
    main()

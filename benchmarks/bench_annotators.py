"""Annotator throughput on 512 px images, and `ctrlnet annotate` over a folder with 1 vs 2 processes.

    .venv/bin/python benchmarks/bench_annotators.py [--images 1000] [--reps 20] [--only NAMES]
    .venv/bin/python benchmarks/bench_annotators.py --caps [--size 4096]

``--caps``: the worst case the parameter ranges allow (``annotators.PARAMS``, whose upper ends are
meant to keep one call within a few seconds): a --size x --size ShapesWorld target (upscaled, with
noise so that it is not flat), each annotator once at its defaults and once with each numeric
parameter at its low and at its high end (the others at their defaults), plus detect_resolution
and image_resolution at 2048; the slowest call per annotator is reported (one call each, after
one warm-up call at the defaults).

Inputs: ShapesWorld targets rendered at 512 px (seed 0); for the pose annotators (pose extra) the
drawn person of ``ctrlnet.testbed.figure`` at 512 px. Per annotator: the mean time of --reps
calls on one image in this process (images/s). Then the whole `annotate` command (read PNG,
annotate, write PNG) over --images files with --workers 1 and 2, canny and softedge.
"""

from __future__ import annotations

import argparse
import inspect
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ctrlnet.annotators import ANNOTATORS, MAX_RESOLUTION, NEEDS, PARAMS, ORDERED, available, get_annotator
from ctrlnet.annotators.batch import annotate
from ctrlnet.testbed.figure import cartoon_person
from ctrlnet.testbed.shapes import generate


def caps(size: int) -> None:
    """The slowest call each annotator's parameter ranges allow, on a size x size image."""
    import cv2
    from ctrlnet.testbed.shapes import render, sample_layout
    small = render(sample_layout(0, seed=0, size=512), 512)["target"]
    rng = np.random.default_rng(0)
    image = cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)
    image = np.clip(image.astype(np.int16) + rng.integers(-12, 13, image.shape), 0, 255).astype(np.uint8)
    print(f"| annotator | defaults s | slowest s | slowest parameters |\n|---|---|---|---|")
    for name in sorted(ANNOTATORS):
        if not available(name):
            continue
        variants = [{}]
        for key, spec in PARAMS[name].items():
            if spec.kind in (int, float):
                variants += [{key: spec.kind(spec.low)}, {key: spec.kind(spec.high)}]
        variants += [{"detect_resolution": MAX_RESOLUTION}, {"image_resolution": MAX_RESOLUTION}]
        get_annotator(name)(image)  # warm-up
        times = []
        for params in variants:
            if name in ORDERED:  # keep the pair ordered: the partner follows past its default
                lo, hi = ORDERED[name]
                defaults = {k: v.default for k, v in inspect.signature(ANNOTATORS[name]).parameters.items()}
                if lo in params:
                    params = params | {hi: max(params[lo], defaults[hi])}
                if hi in params:
                    params = params | {lo: min(params.get(lo, defaults[lo]), params[hi])}
            start = time.perf_counter()
            get_annotator(name, **params)(image)
            times.append((time.perf_counter() - start, params))
        worst = max(times, key=lambda t: t[0])
        print(f"| {name} | {times[0][0]:.2f} | {worst[0]:.2f} | {worst[1] or 'defaults'} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--caps", action="store_true", help="time each annotator at its parameter caps")
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--only", default="", help="comma-separated annotators (e.g. openpose,openpose_full "
                        "in the pose environment); skips the annotate runs")
    args = parser.parse_args()
    if args.caps:
        caps(args.size)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = generate(tmp / "d", args.images if not args.only else 1, seed=0, size=512, progress=False)
        image = np.asarray(Image.open(data / "target" / "0.png").convert("RGB"))
        names = args.only.split(",") if args.only else sorted(ANNOTATORS)
        for name in names:
            if not available(name):
                print(f"{name}: skipped, needs the {NEEDS[name]} extra", flush=True)
                continue
            fn = get_annotator(name)
            # pose: a drawn person (a ShapesWorld image has none, which times the detector alone)
            x = cartoon_person(512)[0] if name in NEEDS else image
            fn(x)
            start = time.perf_counter()
            for _ in range(args.reps):
                fn(x)
            s = (time.perf_counter() - start) / args.reps
            rows.append({"annotator": name, "ms_per_image": round(s * 1000, 1), "images_per_s": round(1 / s, 1)})
            print(json.dumps(rows[-1]), flush=True)
        batch = []
        for name in ("canny", "softedge") if not args.only else ():
            for workers in (1, 2):
                out = tmp / f"out-{name}-{workers}"
                start = time.perf_counter()
                report = annotate(name, [data / "target"], out, workers=workers, progress=False)
                s = time.perf_counter() - start
                assert len(report.written) == args.images and not report.failed
                batch.append({"annotator": name, "workers": workers, "images": args.images, "seconds": round(s, 1),
                              "images_per_s": round(args.images / s, 1)})
                print(json.dumps(batch[-1]), flush=True)
                shutil.rmtree(out)
    print("\n| annotator | ms / 512 px image | images/s |\n|---|---|---|")
    for r in rows:
        print(f"| {r['annotator']} | {r['ms_per_image']} | {r['images_per_s']} |")
    print("\n| annotate | workers | images | seconds | images/s |\n|---|---|---|---|---|")
    for r in batch:
        print(f"| {r['annotator']} | {r['workers']} | {r['images']} | {r['seconds']} | {r['images_per_s']} |")


if __name__ == "__main__":
    main()

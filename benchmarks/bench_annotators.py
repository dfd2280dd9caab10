"""Annotator throughput on 512 px images, and `ctrlnet annotate` over a folder with 1 vs 2 processes.

    .venv/bin/python benchmarks/bench_annotators.py [--images 1000] [--reps 20] [--only NAMES]

Inputs: ShapesWorld targets rendered at 512 px (seed 0); for the pose annotators (pose extra) the
drawn person of ``ctrlnet.testbed.figure`` at 512 px. Per annotator: the mean time of --reps
calls on one image in this process (images/s). Then the whole `annotate` command (read PNG,
annotate, write PNG) over --images files with --workers 1 and 2, canny and softedge.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ctrlnet.annotators import ANNOTATORS, NEEDS, available, get_annotator
from ctrlnet.annotators.batch import annotate
from ctrlnet.testbed.figure import cartoon_person
from ctrlnet.testbed.shapes import generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--only", default="", help="comma-separated annotators (e.g. openpose,openpose_full "
                        "in the pose environment); skips the annotate runs")
    args = parser.parse_args()
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

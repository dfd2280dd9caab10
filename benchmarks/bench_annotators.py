"""Annotator throughput on 512 px images, and `ctrlnet annotate` over a folder with 1 vs 2 processes.

    .venv/bin/python benchmarks/bench_annotators.py [--images 1000] [--reps 20]

Inputs: ShapesWorld targets rendered at 512 px (seed 0). Per annotator: the mean time of --reps
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

from ctrlnet.annotators import ANNOTATORS, get_annotator
from ctrlnet.annotators.batch import annotate
from ctrlnet.testbed.shapes import generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = generate(tmp / "d", args.images, seed=0, size=512, progress=False)
        image = np.asarray(Image.open(data / "target" / "0.png").convert("RGB"))
        for name in sorted(ANNOTATORS):
            fn = get_annotator(name)
            fn(image)
            start = time.perf_counter()
            for _ in range(args.reps):
                fn(image)
            s = (time.perf_counter() - start) / args.reps
            rows.append({"annotator": name, "ms_per_image": round(s * 1000, 1), "images_per_s": round(1 / s, 1)})
            print(json.dumps(rows[-1]), flush=True)
        batch = []
        for name in ("canny", "softedge"):
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

"""Time ShapesWorld generation: `python benchmarks/bench_shapes.py --n 50000 [--workers 2]`.

Writes into a temporary folder and prints one Markdown table row for BENCHMARKS.md.
"""

import argparse
import os
import platform
import shutil
import tempfile
import time

from ctrlnet.testbed.shapes import generate


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    out = tempfile.mkdtemp(prefix="shapes-bench-")
    try:
        start = time.perf_counter()
        generate(out, args.n, seed=0, size=args.size, workers=args.workers, progress=False)
        seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(out)
    workers = args.workers or min(len(os.sched_getaffinity(0)), 8)
    print(f"| {args.n} | {args.size} | {workers} | {seconds:.1f} s | {args.n / seconds:.0f} samples/s | "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs |")


if __name__ == "__main__":
    main()

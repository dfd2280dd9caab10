"""Why ``ctrlnet.prepack`` exists: PyTorch's CPU convolution against oneDNN's prepacked one, per
convolution shape of an SD1.5-sized UNet at 256 px (batch 2 = both CFG halves).

    .venv/bin/python benchmarks/bench_conv_packing.py [--batch 2] [--reps 5]

Per shape: the best of ``--reps`` calls of ``nn.Conv2d`` (plain: the weight is reordered into
oneDNN's blocked layout inside every call) and of ``torch.ops.mkldnn._convolution_pointwise`` on a
weight packed once for that input shape (what ``PackedWeights`` does), as GFLOPS, and the largest
difference between the two outputs.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

# (in channels, out channels, latent side, kernel): the UNet's 3x3 convolutions at 256 px
SHAPES = [(320, 320, 32, 3), (640, 320, 32, 3), (640, 640, 16, 3), (1280, 640, 16, 3), (640, 1280, 8, 3),
          (1280, 1280, 8, 3), (2560, 1280, 8, 3), (1280, 1280, 4, 3), (2560, 1280, 4, 3), (1280, 1280, 8, 1)]


def best(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    print("| conv | latent | plain GFLOPS | packed GFLOPS | speed-up | max abs diff |")
    print("|---|---|---|---|---|---|")
    for cin, cout, side, k in SHAPES:
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(cin, cout, k, padding=k // 2).eval()
        x = torch.randn(args.batch, cin, side, side)
        pad = [k // 2] * 2
        packed = torch._C._nn.mkldnn_reorder_conv2d_weight(conv.weight.to_mkldnn(), pad, [1, 1], [1, 1], 1,
                                                           list(x.shape))
        run = lambda: torch.ops.mkldnn._convolution_pointwise(x, packed, conv.bias, pad, [1, 1], [1, 1], 1,
                                                              "none", [], "")
        gflop = 2 * args.batch * cin * cout * side * side * k * k / 1e9
        plain, fast = gflop / best(lambda: conv(x), args.reps), gflop / best(run, args.reps)
        diff = (run() - conv(x)).abs().max().item()
        print(f"| {cin}->{cout} {k}x{k} | {side}x{side} | {plain:.0f} | {fast:.0f} | {fast / plain:.2f}x | {diff:.1e} |")
        print(json.dumps({"conv": f"{cin}->{cout} {k}x{k}", "latent": side, "plain_gflops": round(plain, 1),
                          "packed_gflops": round(fast, 1), "max_abs_diff": diff}), flush=True)


if __name__ == "__main__":
    main()

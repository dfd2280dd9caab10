"""Where one controlled denoising step goes, per op: time, FLOPs and GFLOPS (CPU).

    .venv/bin/python benchmarks/profile_step.py [--resolution 256] [--unpacked]

An SD1.5-sized UNet + ControlNet (random weights from the shipped configs), batch 2 (the two CFG
halves), the hint features computed once; by default through ``ctrlnet.prepack`` (packed copies
kept, as after a call's first step). Two warm-up steps, one timed step, one step under
torch.profiler (self time per op), one under torch.utils.flop_counter (FLOPs per op; attention
through the math SDPA backend, whose matmuls the counter sees, and timed as the fused CPU kernel).
Then the fp32 matmul peak probe of ``bench_generate.py``, to compare each op's GFLOPS with.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import matmul_peak_gflops  # noqa: E402
from bench_train import random_sd15_base  # noqa: E402

# profiler op names -> the flop counter's op for the same work
GROUPS = {
    "mkldnn::_convolution_pointwise": "convolution", "aten::mkldnn_convolution": "convolution",
    "aten::addmm": "addmm", "aten::mm": "mm", "aten::bmm": "bmm",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--unpacked", action="store_true", help="PyTorch's plain convolution kernels")
    args = parser.parse_args()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode
    from ctrlnet.allocator import retain_freed_memory
    from ctrlnet.models import ControlNet
    from ctrlnet.models.control import controlled_unet_forward
    from ctrlnet.prepack import PackedWeights
    retain_freed_memory()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        base = random_sd15_base(Path(tmp))
    net = ControlNet.from_unet(base.unet).eval()
    h = args.resolution // 8
    x, text = torch.randn(2, 4, h, h), torch.randn(2, 77, 768)
    torch.set_grad_enabled(False)
    hint = net.embed_condition(torch.rand(1, 3, args.resolution, args.resolution)).repeat(2, 1, 1, 1)

    def step(t: int) -> torch.Tensor:
        t = torch.tensor(t)
        return controlled_unet_forward(base.unet, x, t, text, net(x, t, text, hint=hint))
    with contextlib.nullcontext() if args.unpacked else PackedWeights().active():
        step(900), step(800)
        start = time.perf_counter()
        step(700)
        wall = time.perf_counter() - start
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(600)
    with FlopCounterMode(display=False) as counter, sdpa_kernel([SDPBackend.MATH]):
        step(600)
    flops = defaultdict(float)
    for op, n in counter.get_flop_counts()["Global"].items():
        name = str(op).split(".")[1]
        flops["attention" if name == "bmm" else name] += n  # math SDPA: its bmm are the attention's
    seconds, calls = defaultdict(float), defaultdict(int)
    for e in prof.key_averages():
        group = GROUPS.get(e.key, "other")
        seconds[group] += e.self_cpu_time_total / 1e6
        calls[group] += e.count if group != "other" else 0
    total = sum(seconds.values())
    print(f"{args.resolution} px, {'unpacked' if args.unpacked else 'packed'}: timed step {wall:.2f} s, "
          f"profiled self time {total:.2f} s, {sum(flops.values()) / 1e9:.1f} GFLOP")
    print("\n| op | calls | self time | GFLOP | GFLOPS |\n|---|---|---|---|---|")
    for group in ["convolution", "addmm", "mm", "attention", "other"]:
        gf = flops.get(group, 0) / 1e9
        rate = f"{gf / seconds[group]:.0f}" if gf and seconds[group] else "-"
        print(f"| {group} | {calls[group] or '-'} | {seconds[group]:.2f} s ({seconds[group] / total:.0%}) | "
              f"{gf:.1f} | {rate} |")
    print(f"\nfp32 matmul peak probe (after the steps): {matmul_peak_gflops(torch.float32):.1f} GFLOPS")


if __name__ == "__main__":
    main()

"""fp32 vs bf16-autocast training step on the CPU, for a nano-sized UNet.

    .venv/bin/python benchmarks/bench_train_dtype.py

UNet2DConditionModel (32, 64, 128), 1 layer per block, cross-attention at 8x8 and 4x4,
batch 64 of 16x16x4 latents, 24 text tokens of width 128, fused AdamW. Prints s/step for each.
"""

import time

import torch
from diffusers import UNet2DConditionModel


def step_time(model, inputs, bf16: bool, steps: int = 3) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    for i in range(steps + 1):
        if i == 1:
            start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(*inputs).sample.float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return (time.perf_counter() - start) / steps


def main():
    torch.manual_seed(0)
    types = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 128),
                                layers_per_block=1, down_block_types=types,
                                up_block_types=tuple(reversed([t.replace("Down", "Up") for t in types])),
                                cross_attention_dim=128, attention_head_dim=4, norm_num_groups=16)
    b = 64
    inputs = (torch.randn(b, 4, 16, 16), torch.randint(0, 1000, (b,)), torch.randn(b, 24, 128))
    for bf16 in (False, True):
        print(f"| {'bf16 autocast' if bf16 else 'fp32'} | {step_time(unet, inputs, bf16):.2f} s/step | batch {b} |")


if __name__ == "__main__":
    main()

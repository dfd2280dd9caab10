"""`make demo`: the core on a tiny random base, until the trained nano model lands.

Builds a tiny Stable-Diffusion-shaped base, makes a ControlNet from its UNet, runs one
controlled forward pass (at init it must equal the base bit for bit), saves the ControlNet
in the diffusers and original formats and inspects both files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .base import load_base
from .formats import inspect_checkpoint, load_controlnet, save_controlnet
from .models import ControlledUNet, ControlNet
from .testbed.tiny import write_tiny_base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="outputs/demo")
    args = parser.parse_args()
    out = Path(args.out)
    base = load_base(write_tiny_base(out / "tiny-base", "sd15", seed=0))
    net = ControlNet.from_unet(base.unet)
    print(f"base: {base.kind} ({sum(p.numel() for p in base.unet.parameters()):,} UNet parameters); "
          f"ControlNet: {sum(p.numel() for p in net.parameters()):,} parameters, {net.config.num_residuals} residuals")

    torch.manual_seed(0)
    tokens = base.tokenizer(["a red circle on a blue background"], padding="max_length", return_tensors="pt",
                            max_length=base.tokenizer.model_max_length, truncation=True)
    text = base.text_encoder(tokens.input_ids)[0]  # (1, T, D)
    latents = torch.randn(1, 4, 8, 8)  # (B, 4, h, w)
    condition = torch.rand(1, 3, 64, 64)  # (B, 3, 8h, 8w) in [0, 1]
    with torch.no_grad():
        down, mid = net(latents, 500, text, condition)
        controlled = ControlledUNet(base.unet, [net])(latents, 500, text, [condition])
        plain = base.unet(latents, 500, text).sample
    print("residual shapes:", [tuple(d.shape[1:]) for d in down], "mid", tuple(mid.shape[1:]))
    print("all residuals zero at init:", all(bool((d == 0).all()) for d in down) and bool((mid == 0).all()))
    print("controlled UNet == base UNet bit for bit:", torch.equal(controlled, plain))

    save_controlnet(net, out / "controlnet-diffusers")
    save_controlnet(net, out / "controlnet-original.safetensors", format="original")
    for path in (out / "controlnet-diffusers", out / "controlnet-original.safetensors"):
        info = inspect_checkpoint(path)
        print(json.dumps({k: info[k] for k in ("path", "format", "base", "parameters", "dtype")}))
        again = load_controlnet(path)
        assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), net.state_dict().values()))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

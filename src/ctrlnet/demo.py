"""`make demo`: the bundled nano Stable Diffusion with and without control, then the ControlNet core.

1. The nano base (``src/ctrlnet/testbed/nano-sd``) draws ShapesWorld prompts into a grid PNG.
2. Each bundled nano ControlNet (``src/ctrlnet/testbed/controlnets``) draws held-out ShapesWorld
   conditions (made here, seed 7): a grid PNG per net, rows condition | generated | target |
   the same prompt without control, with the controllability scores printed.
3. A fresh ControlNet is made from the UNet; one controlled forward pass must equal the base bit
   for bit at init; it is saved in the diffusers and original formats and both files inspected.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from .allocator import retain_freed_memory
from .base import load_base
from .eval.control import controllability
from .formats import inspect_checkpoint, load_controlnet, save_controlnet
from .models import ControlledUNet, ControlNet
from .pipeline import Control, Pipeline, text_to_image
from .testbed import NANO_SD, bundled_controlnets
from .testbed.shapes import render, sample_layout
from .testbed.tiny import write_tiny_base

PROMPTS = ["a red circle on a white background", "a blue square on a yellow background",
           "a green triangle on a black background", "an orange circle on a navy background",
           "a purple square on a light gray background", "a yellow triangle on a teal background",
           "a red circle and a blue square on a white background",
           "a white triangle, a pink circle and a cyan square on a brown background"]


def nano_text_to_image(out: Path) -> None:
    base = load_base(NANO_SD)
    start = time.perf_counter()
    images = text_to_image(base, PROMPTS, steps=25, guidance=2.5, guidance_rescale=0.7, seed=0)
    seconds = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    grid = np.concatenate([np.concatenate(list(images[:4]), axis=1), np.concatenate(list(images[4:]), axis=1)])
    cv2.imwrite(str(out / "nano_text_to_image.png"), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    for i, prompt in enumerate(PROMPTS):
        print(f"  [{i}] {prompt}")
    print(f"nano SD: {len(PROMPTS)} images in {seconds:.1f} s -> {out / 'nano_text_to_image.png'}")


def nano_controlled(out: Path, n: int = 6) -> None:
    """Each bundled nano ControlNet through ``ctrlnet.Pipeline`` on new ShapesWorld conditions."""
    names = [k for k in bundled_controlnets() if k.startswith("nano-")]
    if not names:
        print("no bundled nano ControlNets yet")
        return
    pipe = Pipeline.from_pretrained("nano", controlnets=names)
    samples = [sample_layout(i, seed=7, size=128) for i in range(n)]  # seed 7: in no training set
    maps = [render(s, 128) for s in samples]
    prompts = [s.prompt for s in samples]
    plain = [np.asarray(im) for im in pipe(prompts, seed=0).images]  # image i: seed i
    for name in names:
        kind = name.split("-", 1)[1]  # nano-canny -> canny
        start = time.perf_counter()
        # one call: one condition per prompt, image i with seed i (the same noise as `plain`)
        images = [np.asarray(im) for im in pipe(prompts, controls=[Control(name, [m[kind] for m in maps])],
                                                 seed=0).images]
        seconds = time.perf_counter() - start
        scores = [controllability(g, m["target"]) for g, m in zip(images, maps)]
        rows = [np.concatenate([m[kind], g, m["target"], p], axis=1) for g, m, p in zip(images, maps, plain)]
        png = out / f"{name}.png"
        Image.fromarray(np.concatenate(rows)).save(png)
        print(f"{name}: {n} images in {seconds:.1f} s, mask IoU {np.mean([s['iou'] for s in scores]):.3f}, "
              f"edge F1 {np.mean([s['edge_f1'] for s in scores]):.3f} (without control: "
              f"{np.mean([controllability(p, m['target'])['iou'] for p, m in zip(plain, maps)]):.3f} IoU) -> {png}")
        print("   columns: condition | generated | target | same prompt without control")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="outputs/demo")
    args = parser.parse_args()
    try:
        retain_freed_memory()  # reuse freed CPU memory across steps (ctrlnet.allocator)
    except ValueError as e:
        raise SystemExit(f"demo: error: {e}")
    out = Path(args.out)
    if (NANO_SD / "model_index.json").is_file():
        nano_text_to_image(out)
        nano_controlled(out)
        base = load_base(NANO_SD)
    else:
        print("the nano model is not bundled yet: using a tiny random base")
        base = load_base(write_tiny_base(out / "tiny-base", "sd15", seed=0))
    net = ControlNet.from_unet(base.unet)
    print(f"base: {base.kind} ({sum(p.numel() for p in base.unet.parameters()):,} UNet parameters); "
          f"ControlNet: {sum(p.numel() for p in net.parameters()):,} parameters, {net.config.num_residuals} residuals")

    torch.manual_seed(0)
    tokens = base.tokenizer(["a red circle on a blue background"], padding="max_length", return_tensors="pt",
                            max_length=base.tokenizer.model_max_length, truncation=True)
    text = base.text_encoder(tokens.input_ids)[0]  # (1, T, D)
    size = base.unet.config.sample_size
    latents = torch.randn(1, 4, size, size)  # (B, 4, h, w)
    condition = torch.rand(1, 3, size * 8, size * 8)  # (B, 3, 8h, 8w) in [0, 1]
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

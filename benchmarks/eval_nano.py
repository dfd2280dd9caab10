"""Quality of the nano Stable Diffusion on held-out ShapesWorld samples (issue 4).

    .venv/bin/python benchmarks/eval_nano.py --base src/ctrlnet/testbed/nano-sd --data VAL_DIR [--n 200]

- VAE reconstruction PSNR over the first --n held-out targets (128 px, [0, 255] scale);
- text-to-image without control for the first --n single-shape prompts: dominant object colour,
  background colour and shape class (cleaned mask geometry, ctrlnet.eval.shapes) against the prompt.
Prints a JSON report and Markdown rows for BENCHMARKS.md.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ctrlnet.base import load_base
from ctrlnet.eval.shapes import score_single_shape
from ctrlnet.pipeline import text_to_image
from ctrlnet.testbed.nano import load_images, to_unit


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True)
    parser.add_argument("--data", required=True, type=Path, help="held-out ShapesWorld folder (other seed)")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=2.5)
    parser.add_argument("--guidance-rescale", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write a sample grid PNG here")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    base = load_base(args.base)

    images, _ = load_images(args.data, args.n)
    x = to_unit(images)
    recon = torch.cat([base.vae.decode(base.vae.encode(x[i:i + 50]).latent_dist.mean).sample
                       for i in range(0, len(x), 50)])
    mse = ((recon.clamp(-1, 1) - x) * 127.5).square().mean(dim=(1, 2, 3))
    psnr = float((10 * torch.log10(255.0 ** 2 / mse)).mean())

    meta = [json.loads(l) for l in (args.data / "metadata.jsonl").read_text().splitlines()]
    single = [m for m in meta if len(m["shapes"]) == 1][:args.n]
    prompts = [m["text"] for m in single]
    start = time.perf_counter()
    generated = np.concatenate([text_to_image(base, prompts[i:i + 50], steps=args.steps, guidance=args.guidance,
                                              guidance_rescale=args.guidance_rescale, seed=args.seed + i)
                                for i in range(0, len(prompts), 50)])
    seconds = time.perf_counter() - start
    scores = [score_single_shape(img, m["shapes"][0]["colour"], m["shapes"][0]["shape"], m["background"])
              for img, m in zip(generated, single)]
    report = {
        "vae_psnr_db": round(psnr, 2), "n_psnr": len(x), "n_prompts": len(single),
        "colour_accuracy": float(np.mean([s["colour_ok"] for s in scores])),
        "background_accuracy": float(np.mean([s["background_ok"] for s in scores])),
        "shape_accuracy": float(np.mean([s["shape_ok"] for s in scores])),
        "steps": args.steps, "guidance": args.guidance, "guidance_rescale": args.guidance_rescale,
        "seconds_per_image": round(seconds / len(single), 3),
    }
    print(json.dumps(report, indent=2))
    print(f"| VAE PSNR | {psnr:.2f} dB | {len(x)} held-out targets |")
    print(f"| colour / background / shape | {report['colour_accuracy']:.1%} / {report['background_accuracy']:.1%} / "
          f"{report['shape_accuracy']:.1%} | {len(single)} single-shape prompts, DDIM {args.steps}, guidance "
          f"{args.guidance}, rescale {args.guidance_rescale} |")
    if args.out:
        import cv2
        rows = [np.concatenate(list(generated[r * 8:(r + 1) * 8]), axis=1) for r in range(min(4, len(generated) // 8))]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(args.out), cv2.cvtColor(np.concatenate(rows), cv2.COLOR_RGB2BGR))


if __name__ == "__main__":
    main()

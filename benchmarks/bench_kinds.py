"""Every kind of control network side by side: size, training step, generation overhead.

    .venv/bin/python benchmarks/bench_kinds.py sizes                 # params and fp16 file bytes, SD1.5 + SDXL
    .venv/bin/python benchmarks/bench_kinds.py train [--steps 3] [--resolution 256] [--repeat 1]
    .venv/bin/python benchmarks/bench_kinds.py generate [--steps 10] [--resolution 256] [--repeat 2]
    (--base nano: the bundled nano base, ShapesWorld at --resolution 128, --batch 32 as the nano configs;
     --base tiny: a tiny random base, a smoke test of the script, no figures)

- ``sizes``: every kind built on the meta device (no memory) from the shipped SD1.5 / SDXL UNet configs:
  the parameters its file stores and their fp16 bytes (the published files are fp16), with Stability's
  ranks 128 and 256 for Control-LoRA and TencentARC's adapter layouts.
- ``train``: one ``ctrlnet train`` step per kind on an SD1.5-sized random base (``bench_train.random_sd15_base``),
  batch 1, fp32, each kind in its own process (clean peak RSS): the median of ``--steps`` timed steps after
  one warm-up, ``--repeat`` rounds interleaved.
- ``generate``: whole calls (``--steps`` DDIM steps, CFG 7.5, batch 1, latents out) on the same base, per
  kind and for the base alone (first and last in each round), interleaved over ``--repeat`` rounds in one
  process; s/step is the call's wall time over its steps (prompt encoding included).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import make_data, peak_rss_gib, random_sd15_base  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "src" / "ctrlnet" / "configs"
KINDS = ("controlnet", "control_lora", "t2i_adapter")


def unet_config(name: str) -> dict:
    return json.loads((CONFIGS / name / "unet" / "config.json").read_text())


def sizes() -> list[dict]:
    from diffusers import T2IAdapter, UNet2DConditionModel
    from ctrlnet.models.adapter import adapter_for_unet
    from ctrlnet.models.control_lora import ControlLoRA
    from ctrlnet.models.controlnet import ControlNet
    from ctrlnet.models.union import ControlNetUnion
    rows = []
    for base in ("sd15", "sdxl"):
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(unet_config(base))
            nets = {"ControlNet": ControlNet.from_unet(unet, load_weights_from_unet=False)}
            if base == "sdxl":
                nets["Union (6 types)"] = ControlNetUnion.from_unet(unet, 6, load_weights_from_unet=False)
                nets["Union ProMax (8 types)"] = ControlNetUnion.from_unet(unet, 8, load_weights_from_unet=False)
            for rank in (128, 256):
                nets[f"Control-LoRA rank {rank}"] = ControlLoRA.from_unet(unet, rank=rank)
            if base == "sd15":
                nets["T2I-Adapter (full)"] = adapter_for_unet(dict(unet.config), "full_adapter")
                nets["T2I-Adapter (light)"] = T2IAdapter(channels=[320, 640, 1280], num_res_blocks=4,
                                                         adapter_type="light_adapter")
            else:
                nets["T2I-Adapter (full, XL)"] = adapter_for_unet(dict(unet.config))
        unet_params = sum(p.numel() for p in unet.parameters())
        for name, net in nets.items():
            stored = net.own_state_dict() if isinstance(net, ControlLoRA) else net.state_dict()
            n = sum(v.numel() for v in stored.values())
            rows.append({"base": base, "kind": name, "stored_params": n, "fp16_bytes": 2 * n,
                         "of_unet": round(n / unet_params, 4)})
    return rows


def train_child(kind: str, steps: int, resolution: int, base_name: str, batch: int) -> dict:
    from ctrlnet.base import load_base
    from ctrlnet.training import load_config
    from ctrlnet.training.trainer import Trainer
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        nano = base_name == "nano"
        base = load_base("nano") if nano else random_sd15_base(tmp)
        data = make_data(tmp, resolution)
        cfg = load_config(None, dict(base=base_name, data=str(data / "prompt_canny.json"), output_dir=str(tmp / "r"),
                                     resolution=resolution, train_batch_size=batch, max_train_steps=steps + 1,
                                     checkpointing_steps=10**6, log_every=1, tensorboard=False, network=kind,
                                     lora_rank=16 if nano else 128, cpu=True,
                                     hint_channels=[16, 32, 64, 128] if nano else [16, 32, 96, 256]))
        tr = Trainer(cfg, progress=False, base=base)
        trainable = sum(p.numel() for p in tr.optimizer.param_groups[0]["params"])
        tr.train()
        log = [json.loads(x) for x in (tmp / "r" / "log.jsonl").read_text().splitlines() if '"loss"' in x]
    times = [r["step_s"] for r in log][1:]
    return {"kind": kind, "trainable_params": trainable, "step_times": times, "step_s": statistics.median(times),
            "peak_rss_gib": round(peak_rss_gib(), 2), "resolution": resolution, "batch": batch, "base": base_name,
            "threads": torch.get_num_threads()}


def generation(steps: int, resolution: int, repeat: int, base_name: str) -> list[dict]:
    from ctrlnet.base import load_base
    from ctrlnet.models.adapter import adapter_for_unet
    from ctrlnet.models.control_lora import ControlLoRA
    from ctrlnet.models.controlnet import ControlNet
    from ctrlnet.models.union import ControlNetUnion
    from ctrlnet.pipeline import Control, Pipeline
    from ctrlnet.testbed.tiny import write_tiny_base
    with tempfile.TemporaryDirectory() as d:
        if base_name == "sd15":
            base = random_sd15_base(Path(d))
        else:
            base = load_base(write_tiny_base(Path(d) / "b", "sd15") if base_name == "tiny" else "nano")
        unet = base.unet
        rank = 128 if base_name == "sd15" else 16
        nets = {"controlnet": ControlNet.from_unet(unet), "union": ControlNetUnion.from_unet(unet, 8),
                "control_lora": ControlLoRA.from_unet(unet, rank=rank),
                "t2i_adapter": adapter_for_unet(dict(unet.config)).eval()}
        pipe = Pipeline(base, nets)
        rng = np.random.default_rng(0)
        edges = (rng.random((resolution, resolution, 3)) > 0.8).astype(np.uint8) * 255
        depth = rng.integers(0, 255, (resolution, resolution, 3), dtype=np.uint8)
        cases = {"base alone": [], "ControlNet": [Control("controlnet", edges)],
                 "Union, 1 pair": [Control("union", edges, type="canny")],
                 "Union, 2 pairs (one unit)": [Control("union", [edges, depth], type=["canny", "depth"])],
                 f"Control-LoRA r{rank}": [Control("control_lora", edges)],
                 "T2I-Adapter": [Control("t2i_adapter", edges)]}
        times: dict[str, list[float]] = {k: [] for k in cases}
        run = lambda controls: pipe("a photo", controls=controls, steps=steps, guidance=7.5, seed=0,  # noqa: E731
                                    width=resolution, height=resolution, output_type="latent")
        run([])  # warm-up: first calls allocate and pack
        for name, controls in cases.items():
            run(controls)
        order = list(cases) + ["base alone"]  # the base alone first and last in each round: drift shows
        for _ in range(repeat):
            for name in order:
                t0 = time.perf_counter()
                run(cases[name])
                times[name].append((time.perf_counter() - t0) / steps)
    base_s = statistics.median(times["base alone"])
    return [{"case": k, "s_per_step": round(statistics.median(v), 3), "rounds": [round(x, 3) for x in v],
             "overhead_vs_base": round(statistics.median(v) / base_s - 1, 3)} for k, v in times.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["sizes", "train", "generate"])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--base", default="sd15", choices=["sd15", "nano", "tiny"])
    parser.add_argument("--batch", type=int, default=1, help="train: batch size (the nano configs use 32)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(train_child(args.child, args.steps, args.resolution, args.base, args.batch)),
              flush=True)
        return
    if args.what == "sizes":
        print("| base | kind | parameters stored | fp16 file | of the UNet |\n|---|---|---|---|---|")
        for r in sizes():
            print(f"| {r['base']} | {r['kind']} | {r['stored_params'] / 1e6:,.1f} M | "
                  f"{r['fp16_bytes'] / 2**20:,.0f} MiB | {100 * r['of_unet']:.1f}% |")
    elif args.what == "train":
        results = []
        for kind in KINDS * args.repeat:
            out = subprocess.run([sys.executable, __file__, "train", "--child", kind, "--steps", str(args.steps or 3),
                                  "--resolution", str(args.resolution), "--base", args.base,
                                  "--batch", str(args.batch)],
                                 capture_output=True, text=True)
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode or not line:
                print(out.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"kind {kind} failed")
            results.append(json.loads(line[0][7:]))
            print(json.dumps(results[-1]), flush=True)
        print("\n| network | trainable params | s/step (median) | peak RSS GiB |\n|---|---|---|---|")
        for kind in KINDS:
            rs = [r for r in results if r["kind"] == kind]
            med = statistics.median(t for r in rs for t in r["step_times"])
            print(f"| {kind} | {rs[0]['trainable_params'] / 1e6:,.1f} M | {med:.3g} | "
                  f"{max(r['peak_rss_gib'] for r in rs):.2f} |")
    else:
        rows = generation(args.steps or 10, args.resolution, args.repeat, args.base)
        for r in rows:
            print(json.dumps(r))
        print("\n| unit | s/step (median) | over the base alone |\n|---|---|---|")
        for r in rows:
            print(f"| {r['case']} | {r['s_per_step']:.3g} | {100 * r['overhead_vs_base']:+.0f}% |")


if __name__ == "__main__":
    main()

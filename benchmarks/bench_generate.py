"""Controlled generation speed, SD1.5-sized (random weights from the shipped configs), CPU or GPU:
ctrlnet's Pipeline against diffusers' StableDiffusionControlNetPipeline, one run, same weights.

    .venv/bin/python benchmarks/bench_generate.py [--resolutions 256,512] [--steps 4] [--device cpu|cuda]
        [--dtypes fp32,bf16,fp16] [--channels-last] [--compile] [--repeat N] [--allocator system|retain]
        [--modes 'diffusers fp32,ctrlnet fp32'] [--every 2,4] [--openvino]
    .venv/bin/python benchmarks/bench_generate.py --peak-rss [--resolutions 512] [--steps 2]

Per resolution, one prompt, CFG 7.5 (both halves batched), one ControlNet, DDIM:

- ``diffusers fp32``: diffusers' pipeline with its default dtype (fp32);
- ``ctrlnet fp32`` / ``ctrlnet bf16`` / ``ctrlnet fp16``: ours (weights and compute in that dtype;
  on a CPU in fp32 with its default packed weights, ``ctrlnet.prepack``);
- ``ctrlnet fp32 unpacked`` (CPU): ours with ``packed_weights=False`` (PyTorch's plain kernels);
  ``ctrlnet fp32 packed copies kept``: ``packed_weights=PackedWeights()``, packed copies kept next to
  the weights across calls (the default packs in place at each call's first step);
- ``base only``: ours without the ControlNet (the ControlNet's overhead is the difference);
- ``end=0.5``: ours with the ControlNet active for the first half of the steps only (skipped after).
- ``every=K`` (``--every 2,4``): ours with ControlNet reuse, the net run at every K-th step and its
  residuals reused in between (``Control(every=K)``).
- ``--openvino`` (CPU): ``ctrlnet openvino DTYPE`` (``Pipeline(backend="openvino")``, fp32 and bf16
  inference precision), with its base only / end=0.5 / every=K rows, against ``openvino reference
  DTYPE``: the loop OpenVINO's own ControlNet examples run, i.e. diffusers' ControlNetModel (hint
  encoder included) and the UNet converted with static shapes and called every step on both CFG
  halves, DDIM and CFG in PyTorch (what a user of OpenVINO alone gets; like diffusers it has no
  start/end, so it has no end=0.5 row: diffusers' pipeline runs the net at scale 0 after the end).
  Their warm-up call runs 2 steps (with 1, end=0.5 would leave the net out and compile it in the
  timing). Each OpenVINO mode's compiled models are dropped after its timing (memory: every compiled
  model holds its weights once more), so its warm-up call reads the converted model back and compiles
  it again (the reference's models are converted at its first warm-up and saved as IR, as ours).
  Conversion is timed apart: ``openvino_first_call`` gives a 1-step call's seconds with an empty
  cache (converting the UNet and the ControlNet; latents out, so no decoder) and with them cached.
- ``compiled`` (``--compile``): ours with ``Pipeline(compile=True)`` (``torch.compile``; on a GPU
  mode "reduce-overhead": inductor's kernels replayed as CUDA graphs; on a CPU inductor with
  freezing), controlled, base only and end=0.5. Their warm-up call runs 4 steps instead of 1, so
  that every graph is compiled and (CUDA graph trees record at a function's second call) recorded
  before the timing; ``first_call_s`` is that warm-up call in the first round, the compiling included.

s/step: after a 1-step warm-up call, the time from the start of a ``--steps`` call to its last
step's callback, divided by the steps (end=0.5 with 4 steps: 2 steps with, 2 without the net); on a
GPU the first and last callbacks wait for the GPU (``torch.cuda.synchronize()``) before their
timestamps. Steady s/step: from the first step's callback to the last's, divided by steps - 1,
i.e. without the per-call work (prompt encoding, hint features, the in-place packing in the first
step), which a few-step call magnifies; for end=0.5 it covers the later steps only. S/step to
return: from the start to the call's return, divided by the steps: also what runs after the last
step (the in-place default restores its weights there; latents are returned, not decoded). With
``--repeat N`` every mode is timed N times, the modes interleaved round by round (machines drift:
the same mode moved by 63% between two runs on a GPU), and the median is reported.

GFLOPS = FLOPs of one step (UNet + active ControlNet, counted with torch.utils.flop_counter,
attention through the math SDPA backend; the hint encoder in diffusers' rows only, since ours runs it
once per call) / s/step, also as a fraction of this machine's measured
matmul peak in that dtype (the best square matmul of 1024, 2048 and 3072 on a CPU; 4096 and 8192 on
a GPU, where fp32 rows are also given against the TF32 peak, since cuDNN runs fp32 convolutions in
TF32 by default). Default dtypes: on a CPU fp32, plus bf16 only where bf16 matmul is native (faster
than a quarter of fp32; on CPUs without AVX512-BF16/AMX it is skipped and the peaks say why); on a
GPU fp32, bf16 and fp16. PyTorch's TF32 defaults are kept for both pipelines (matmuls in full fp32,
cuDNN convolutions in TF32). The matmul peak is probed before and after the timings and the higher
of the two is used (this machine drifts; a low probe would inflate the fractions).

``--peak-rss`` measures memory instead: the peak RSS of one generation with the default (convolution
weights packed in place), with packed copies kept, with linear weights packed too (kept) and
unpacked, each in its own process.

``--allocator retain`` calls ``ctrlnet.allocator.retain_freed_memory()`` first, as ``ctrlnet
generate`` does: freed CPU memory is kept for reuse instead of being mapped and faulted in again
every step. It is process-wide, so it applies to diffusers' pipeline in the same run too; the
default ``system`` keeps glibc's own behaviour (what a diffusers user gets). Minor page faults per
step are reported per mode.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import random_sd15_base  # noqa: E402  (the same SD1.5-sized random base)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_gflops(dtype: torch.dtype, device: torch.device = torch.device("cpu"), sizes=None,
                       reps: int = 3) -> float:
    """This machine's matmul peak in ``dtype``: the best single square matmul over a few sizes (larger
    ones amortise packing better). A first slow size (emulated bf16) stops the probe early."""
    sizes = sizes or ((4096, 8192) if device.type == "cuda" else (1024, 2048, 3072))
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
        a @ b
        for _ in range(reps):
            sync(device)
            start = time.perf_counter()
            a @ b
            sync(device)
            best = max(best, 2 * n ** 3 / (time.perf_counter() - start) / 1e9)
        if best < 10:  # emulated: larger sizes would take minutes and say nothing new
            break
    return best


def step_flops(base, net, resolution: int, device: torch.device) -> tuple[float, float, float]:
    """(UNet GFLOP, ControlNet GFLOP without its hint encoder, hint encoder GFLOP) of one CFG step
    (batch 2). Ours runs the hint encoder once per call, diffusers' pipeline at every step, so only
    diffusers' rows count it per step (until the sixth session every row did, which overstated ours by
    ~2%). Attention is counted through PyTorch's math SDPA backend: the counter sees its matmuls on
    every device, whereas on the CPU it counts the fused SDPA kernel as 0 FLOPs (the first session's
    CPU figures missed it)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    h = resolution // 8
    x = torch.randn(2, 4, h, h, device=device)
    text = torch.randn(2, 77, 768, device=device)
    cond = torch.rand(2, 3, resolution, resolution, device=device)
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        with FlopCounterMode(display=False) as fc:
            base.unet(x, 500, text)
        unet = fc.get_total_flops() / 1e9
        with FlopCounterMode(display=False) as fc:
            hint = net.embed_condition(cond)
        hint_encoder = fc.get_total_flops() / 1e9
        with FlopCounterMode(display=False) as fc:
            net(x, 500, text, hint=hint)
        control = fc.get_total_flops() / 1e9
    return unet, control, hint_encoder


def timed(run, steps: int, device: torch.device, warmup: int = 1) -> tuple[float, float, float, float, float]:
    """(seconds, minor page faults) per denoising step, the warm-up's seconds, the steady seconds per
    step and the seconds per step to the call's return: a ``warmup``-step call, then ``steps`` steps
    from the call's start to the last step's callback (prompt encoding and hint features, done once,
    are included; decoding is not). Steady: from the first step's callback to the last one's, per step
    (without the call's setup and first step, where the in-place packing happens; NaN for 1 step). To
    return: from the start to the call's return, per step (also what runs after the last step: the
    in-place default's restore of the weights; latents out, so no decoding)."""
    sync(device)
    warm = time.perf_counter()
    run(warmup, lambda: None)
    sync(device)
    warm = time.perf_counter() - warm
    stamps = []

    def stamp():  # waits for the GPU at the first and last steps only, so the host may run ahead as in real use
        if len(stamps) in (0, steps - 1):
            sync(device)
        stamps.append(time.perf_counter())
    sync(device)
    start = time.perf_counter()
    faults = minor_faults()
    run(steps, stamp)
    sync(device)
    returned = time.perf_counter()
    assert len(stamps) == steps
    steady = (stamps[-1] - stamps[0]) / (steps - 1) if steps > 1 else float("nan")
    return (stamps[-1] - start) / steps, (minor_faults() - faults) / steps, warm, steady, (returned - start) / steps


def openvino_reference(base, theirs, cond, prompt: str, res: int, precision: str, folder: Path):
    """run(steps, callback) for OpenVINO's own ControlNet loop (see the module docstring): diffusers'
    ControlNetModel, hint encoder included, and the UNet as static-shape OpenVINO models, the net run
    at every step on both CFG halves; returns (run, release). The converted models are saved in
    ``folder`` at the first call (shared by both precisions) and compiled from there."""
    import openvino as ov
    from diffusers import DDIMScheduler
    from ctrlnet.pipeline.text import guidance_text
    h = res // 8
    image = torch.from_numpy(np.asarray(cond)).permute(2, 0, 1)[None].float().div(255).repeat(2, 1, 1, 1)
    models = {}

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = theirs.requires_grad_(False)

        def forward(self, x, t, text, image):
            down, mid = self.net(x, t, text, controlnet_cond=image, return_dict=False)
            return (*down, mid)

    class UNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = base.unet

        def forward(self, x, t, text, *res):
            return self.unet(x, t, text, down_block_additional_residuals=list(res[:-1]),
                             mid_block_additional_residual=res[-1], return_dict=False)[0]

    def compiled():
        if not models:
            if not (folder / "unet.xml").is_file():
                x, t, text = torch.randn(2, 4, h, h), torch.tensor([999.0]), torch.randn(2, 77, 768)
                res_ex = Net()(x, t, text, image)
                folder.mkdir(parents=True, exist_ok=True)
                ov.save_model(ov.convert_model(Net(), example_input=(x, t, text, image)), str(folder / "net.xml"),
                              compress_to_fp16=False)
                ov.save_model(ov.convert_model(UNet(), example_input=(x, t, text, *res_ex)), str(folder / "unet.xml"),
                              compress_to_fp16=False)
            core = ov.Core()
            props = {"INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16"}[precision],
                     "PERFORMANCE_HINT": "LATENCY"}
            for name in ("net", "unet"):
                models[name] = core.compile_model(core.read_model(str(folder / f"{name}.xml")), "CPU", props)
        return models["net"], models["unet"]

    def run(steps, cb):
        net, unet = compiled()
        text, _ = guidance_text(base, [prompt], "", True, res, res)  # (2, 77, 768) [uncond; cond]
        sched = DDIMScheduler.from_config(base.scheduler.config)
        sched.set_timesteps(steps)
        latents = torch.randn(1, 4, h, h, generator=torch.Generator().manual_seed(0)) * sched.init_noise_sigma
        for t in sched.timesteps:
            x = sched.scale_model_input(torch.cat([latents] * 2), t)
            ins = [x.numpy(), np.array([float(t)], np.float32), text.numpy()]
            residuals = net([*ins, image.numpy()])
            pred = torch.from_numpy(unet([*ins, *(residuals[o] for o in net.outputs)])[0])
            uncond, cond_pred = pred.chunk(2)
            latents = sched.step(uncond + 7.5 * (cond_pred - uncond), t, latents, return_dict=False)[0]
            cb()
        return latents
    return run, models.clear


def openvino_modes(runs, releases, base, net, theirs, cond, prompt, res, dtypes, everys, tmp: Path) -> None:
    """The ``--openvino`` rows (module docstring), and the first-call times with an empty and a warm cache."""
    from ctrlnet.pipeline import Control, Pipeline
    from ctrlnet.pipeline.openvino import OpenVINOBackend
    image = np.asarray(cond)
    torch_dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    first = {}
    for dtype in [d for d in dtypes if d in torch_dtypes]:
        cache = tmp / f"openvino-{res}-{dtype}"  # one cache per precision: each "empty cache" call converts
        pipe = Pipeline(base, {"net": net}, backend=OpenVINOBackend(torch_dtypes[dtype], cache_dir=cache))

        def run(k, cb, pipe=pipe, controls=(Control("net", image),)):
            return pipe(prompt, controls=list(controls), steps=k, callback=lambda i: cb(), guidance=7.5,
                        guidance_rescale=0.0, width=res, height=res, output_type="latent")
        times = {}
        for when in ("empty cache", "cached"):  # the first converts
            start = time.perf_counter()
            run(1, lambda: None)
            times[when] = round(time.perf_counter() - start, 1)
            pipe.reset_backend()
        first[dtype] = times
        label = f"ctrlnet openvino {dtype}"
        runs[label] = run
        runs[f"{label} base only"] = lambda k, cb, run=run: run(k, cb, controls=())
        runs[f"{label} end=0.5"] = lambda k, cb, run=run: run(k, cb, controls=(Control("net", image, end=0.5),))
        for every in everys:
            runs[f"{label} every={every}"] = lambda k, cb, run=run, every=every: run(
                k, cb, controls=(Control("net", image, every=every),))
        for mode in [m for m in runs if m.startswith(label)]:
            releases[mode] = pipe.reset_backend
        reference, release = openvino_reference(base, theirs, cond, prompt, res, dtype, tmp / f"reference-{res}")
        runs[f"openvino reference {dtype}"] = reference
        releases[f"openvino reference {dtype}"] = release
    print(json.dumps({"resolution": res, "openvino_first_call": first,
                      "note": "1-step call, s; empty cache = converting the UNet and the ControlNet "
                              "(latents out: no decoder)"}),
          flush=True)


def minor_faults() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def peak_rss(args) -> None:
    """``--peak-rss``: what the packed copies cost in memory, as ``ctrlnet generate`` would run
    (allocator retained, one ControlNet, CFG 7.5, decoding included), one fresh process per variant."""
    import resource
    import subprocess
    res = int(args.resolutions.split(",")[0])
    if not args.child:
        for variant in ("packed", "kept", "linear", "unpacked"):
            out = subprocess.run([sys.executable, __file__, "--child", variant, "--resolutions", str(res),
                                  "--steps", str(args.steps)], capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(out.stderr)
            print(out.stdout.strip().splitlines()[-1], flush=True)
        return
    from ctrlnet.allocator import retain_freed_memory
    from ctrlnet.models import ControlNet
    from ctrlnet.pipeline import Control, Pipeline
    from ctrlnet.prepack import PackedWeights
    retain_freed_memory()
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        base = random_sd15_base(Path(tmp))
        net = ControlNet.from_unet(base.unet).eval()
        packed = {"packed": None, "kept": PackedWeights(), "linear": PackedWeights(linear=True),
                  "unpacked": False}[args.child]
        pipe = Pipeline(base, {"net": net}, packed_weights=packed)
        loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        cond = (np.random.default_rng(0).random((res, res, 3)) > 0.8).astype(np.uint8) * 255
        pipe("a red circle", controls=[Control("net", cond)], steps=args.steps, guidance=7.5, width=res, height=res)
        print(json.dumps({"variant": args.child, "resolution": res, "steps": args.steps,
                          "peak_rss_gib_after_loading": round(loaded, 2),
                          "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2),
                          "packed_gib": round(max(pipe.packed.nbytes, pipe.packed.last_nbytes) / 2 ** 30, 2)
                          if pipe.packed is not None else 0}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolutions", default="256,512")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtypes", default="", help="ours in these dtypes (default: see above)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds over the modes, interleaved; median")
    parser.add_argument("--every", default="", help="ControlNet reuse modes to time, e.g. 2,4 (every=K rows)")
    parser.add_argument("--openvino", action="store_true",
                        help="also the OpenVINO backend and OpenVINO's reference loop (CPU): see above")
    parser.add_argument("--channels-last", action="store_true",
                        help="also ours with Pipeline(channels_last=True): rows 'ctrlnet DTYPE channels_last'")
    parser.add_argument("--compile", action="store_true",
                        help="also ours with Pipeline(compile=True): rows 'ctrlnet DTYPE compiled'")
    parser.add_argument("--allocator", default="system", choices=["system", "retain"],
                        help="retain: ctrlnet.allocator.retain_freed_memory() for the whole process (see above)")
    parser.add_argument("--peak-rss", action="store_true",
                        help="instead of timings: peak RSS of one generation (--steps steps, first resolution) "
                             "with the default (packed in place), packed copies kept, linear layers packed too "
                             "and unpacked, each in a fresh process")
    parser.add_argument("--modes", default="",
                        help="time only these modes (comma-separated row labels, e.g. 'diffusers fp32,ctrlnet fp32'; "
                             "'diffusers fp32' is always kept as the reference); default: all")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    everys = [int(k) for k in args.every.split(",") if k.strip()]
    if args.peak_rss or args.child:
        return peak_rss(args)
    if args.allocator == "retain":
        from ctrlnet.allocator import retain_freed_memory
        if not retain_freed_memory():
            raise SystemExit("--allocator retain: not available here (glibc only, or CTRLNET_CPU_ALLOCATOR=system)")
    device = torch.device(args.device)
    from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline
    from PIL import Image
    from ctrlnet.formats import save_controlnet
    from ctrlnet.models import ControlNet
    from ctrlnet.pipeline import Control, Pipeline
    from ctrlnet.prepack import PackedWeights
    torch.set_grad_enabled(False)
    torch_dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if args.dtypes:
        dtypes = args.dtypes.split(",")
    else:
        dtypes = ["fp32", "bf16", "fp16"] if device.type == "cuda" else ["fp32", "bf16"]
    peaks = {d: matmul_peak_gflops(torch_dtypes[d], device) for d in dict.fromkeys(["fp32", *dtypes])}
    if device.type == "cuda":  # cuDNN runs fp32 convolutions in TF32 by default: also the TF32 matmul peak
        torch.backends.cuda.matmul.allow_tf32 = True
        peaks["tf32"] = matmul_peak_gflops(torch.float32, device)
        torch.backends.cuda.matmul.allow_tf32 = False
    print(json.dumps({"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                      "matmul_peak_gflops": {k: round(v, 1) for k, v in peaks.items()},
                      "threads": torch.get_num_threads(), "torch": torch.__version__,
                      "allocator": args.allocator}), flush=True)
    if device.type == "cpu" and not args.dtypes and "bf16" in peaks and peaks["bf16"] < peaks["fp32"] / 4:
        # bf16 only where the CPU computes it natively (AVX512-BF16 / AMX); emulated bf16 runs ~100x slower
        dtypes = ["fp32"]
        print(f"bf16 skipped: {peaks['bf16']:.1f} GFLOPS bf16 matmul on this CPU (no native bf16)", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = random_sd15_base(Path(tmp))
        net = ControlNet.from_unet(base.unet).eval()  # built on the CPU (from the CPU UNet), moved below
        with torch.no_grad():  # move the zero convs off zero, as after training
            for m in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
                for p in m.parameters():
                    p.normal_(0, 0.01)
        save_controlnet(net, Path(tmp) / "net")
        theirs = ControlNetModel.from_pretrained(Path(tmp) / "net", local_files_only=True).eval().to(device)
        base.to(device)
        net.to(device)
        for res in [int(r) for r in args.resolutions.split(",")]:
            unet_gf, control_gf, hint_gf = step_flops(base, net, res, device)
            cond = Image.fromarray((np.random.default_rng(0).random((res, res, 3)) > 0.8).astype(np.uint8) * 255)
            prompt = "a photo of a red circle on a blue background"
            runs = {}  # mode -> run(steps, callback)
            ref = StableDiffusionControlNetPipeline(
                vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                unet=base.unet, controlnet=theirs, scheduler=DDIMScheduler.from_config(base.scheduler.config),
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)
            ref.set_progress_bar_config(disable=True)
            runs["diffusers fp32"] = lambda n, cb: ref(
                prompt, image=cond, num_inference_steps=n, guidance_scale=7.5, height=res, width=res,
                output_type="latent", callback_on_step_end=lambda p, i, t, kw: (cb(), kw)[1])
            pipes = []  # kept alive for the rounds
            releases = {}  # mode -> what frees its memory after its timing (OpenVINO's compiled models)
            if args.openvino:
                openvino_modes(runs, releases, base, net, theirs, cond, prompt, res, dtypes, everys, Path(tmp))
            # (dtype, channels_last, packed_weights, compile)
            variants = ([(d, False, None, False) for d in dtypes]
                        + ([(d, True, None, False) for d in dtypes] if args.channels_last else [])
                        + ([(d, False, None, True) for d in dtypes] if args.compile else []))
            if device.type == "cpu" and "fp32" in dtypes:  # the default (packed weights) against plain kernels
                variants[dtypes.index("fp32") + 1:dtypes.index("fp32") + 1] = [
                    ("fp32", False, False, False), ("fp32", False, PackedWeights(), False)]
            for dtype, nhwc, packed, compiled in variants:
                torch_dtype = torch_dtypes[dtype]
                b, n = (base, net) if dtype == "fp32" and not nhwc else (copy.deepcopy(base).to(dtype=torch_dtype),
                                                                          copy.deepcopy(net))
                pipe = Pipeline(b, {"net": n}, dtype=torch_dtype, channels_last=nhwc, packed_weights=packed,
                                compile=compiled)
                label = (f"{dtype} channels_last" if nhwc else f"{dtype} unpacked" if packed is False
                         else f"{dtype} packed copies kept" if packed is not None
                         else f"{dtype} compiled" if compiled else dtype)
                pipes.append((label, pipe))
                image = np.asarray(cond)

                def run(k, cb, pipe=pipe, controls=(Control("net", image),)):
                    return pipe(prompt, controls=list(controls), steps=k, callback=lambda i: cb(), guidance=7.5,
                                guidance_rescale=0.0, width=res, height=res, output_type="latent")
                runs[f"ctrlnet {label}"] = run
                if packed is not None:  # the variants: controlled only
                    continue
                runs[f"ctrlnet {label} base only"] = lambda k, cb, run=run: run(k, cb, controls=())
                runs[f"ctrlnet {label} end=0.5"] = lambda k, cb, run=run: run(
                    k, cb, controls=(Control("net", image, end=0.5),))
                for every in everys:
                    runs[f"ctrlnet {label} every={every}"] = lambda k, cb, run=run, every=every: run(
                        k, cb, controls=(Control("net", image, every=every),))
            if args.modes:  # long calls (e.g. 20 steps at 512 px) leave time for a few modes only
                wanted = ["diffusers fp32", *(m.strip() for m in args.modes.split(",") if m.strip())]
                unknown = [m for m in wanted if m not in runs]
                if unknown:
                    raise SystemExit(f"--modes: unknown {unknown}; the modes of this run: {list(runs)}")
                runs = {mode: runs[mode] for mode in dict.fromkeys(wanted)}
            times = {mode: [] for mode in runs}
            faults = {mode: [] for mode in runs}
            first_call = {}  # mode -> the first round's warm-up seconds (compiled modes compile there)
            steady = {mode: [] for mode in runs}
            to_return = {mode: [] for mode in runs}
            for _ in range(args.repeat):
                for mode, run in runs.items():
                    warmup = 4 if "compiled" in mode else 2 if "openvino" in mode else 1
                    seconds, step_faults, warm, steady_s, call_s = timed(run, args.steps, device, warmup=warmup)
                    times[mode].append(seconds)
                    steady[mode].append(steady_s)
                    to_return[mode].append(call_s)
                    faults[mode].append(step_faults)
                    first_call.setdefault(mode, warm)
                    if mode in releases:
                        releases[mode]()
            results = {mode: statistics.median(ts) for mode, ts in times.items()}
            for label, pipe in pipes:  # how much was packed (kept copies: that much more memory)
                if pipe.packed is not None and f"ctrlnet {label}" in runs:
                    n, size = ((pipe.packed.last_packed, pipe.packed.last_nbytes) if pipe.packed.in_place
                               else (len(pipe.packed), pipe.packed.nbytes))
                    print(json.dumps({"resolution": res, "packed_weights": n, "packed_gib": round(size / 2 ** 30, 2),
                                      "in_place": pipe.packed.in_place}), flush=True)
            del ref, pipes, runs, run, pipe, b, n  # free the dtype copies before the next resolution
            if args.compile:
                torch._dynamo.reset()  # and the compiled graphs (CUDA graph pools, CPU frozen weights)
            for d in dict.fromkeys(["fp32", *dtypes]):  # the machine drifts: probe again, keep the higher peak
                again = matmul_peak_gflops(torch_dtypes[d], device)
                if again > peaks[d]:
                    print(f"matmul peak {d}: {peaks[d]:.1f} -> {again:.1f} GFLOPS (probed again)", flush=True)
                    peaks[d] = again
            ref_s = results["diffusers fp32"]
            for mode, s in results.items():
                dtype = next((d for d in ("bf16", "fp16") if d in mode), "fp32")
                if mode.startswith("openvino reference"):  # its hint encoder runs every step, as diffusers'
                    flops_hint = hint_gf
                else:
                    flops_hint = hint_gf if mode.startswith("diffusers") else 0
                every = int(mode.split("every=")[1]) if "every=" in mode else 1
                share = 0 if "base only" in mode else 0.5 if "end=0.5" in mode else -(-args.steps // every) / args.steps
                flops = unet_gf + control_gf * share + flops_hint
                row = {"resolution": res, "mode": mode, "s_per_step": round(s, 4),
                       "rounds": [round(t, 4) for t in times[mode]],
                       "page_faults_per_step": round(statistics.median(faults[mode])),
                       "speedup_vs_diffusers_fp32": round(ref_s / s, 2), "gflop_per_step": round(flops, 1),
                       "gflops": round(flops / s, 1), "dtype": dtype, "first_call_s": round(first_call[mode], 1),
                       "steady_s_per_step": round(statistics.median(steady[mode]), 4),
                       "steady_speedup_vs_diffusers_fp32": round(statistics.median(steady["diffusers fp32"])
                                                                 / statistics.median(steady[mode]), 2),
                       "to_return_s_per_step": round(statistics.median(to_return[mode]), 4),
                       "to_return_speedup_vs_diffusers_fp32": round(statistics.median(to_return["diffusers fp32"])
                                                                    / statistics.median(to_return[mode]), 2)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    for r in rows:  # fractions against the final (highest) peaks
        r["peak_fraction"] = round(r["gflops"] / peaks[r["dtype"]], 2)
        if r["dtype"] == "fp32" and "tf32" in peaks:
            r["peak_fraction_tf32"] = round(r["gflops"] / peaks["tf32"], 2)
    print(json.dumps({"peak_fractions": {f"{r['resolution']} {r['mode']}": r["peak_fraction"] for r in rows}}))
    print(f"\nallocator: {args.allocator}; matmul peaks (GFLOPS): "
          + ", ".join(f"{k} {v:.1f}" for k, v in peaks.items()))
    print("\n| px | mode | s/step | vs diffusers fp32 | GFLOP/step | GFLOPS | of matmul peak (its dtype) "
          "| of TF32 peak (GPU fp32) | page faults/step | first call (s) | steady s/step | steady vs diffusers "
          "| s/step to return | to return vs diffusers |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        tf32 = f"{r['peak_fraction_tf32']:.0%}" if "peak_fraction_tf32" in r else "-"
        print(f"| {r['resolution']} | {r['mode']} | {r['s_per_step']:.3g} | {r['speedup_vs_diffusers_fp32']:.2f}x | "
              f"{r['gflop_per_step']:.0f} | {r['gflops']:.0f} | {r['peak_fraction']:.0%} | {tf32} | "
              f"{r['page_faults_per_step']:,} | {r['first_call_s']:.1f} | {r['steady_s_per_step']:.3g} | "
              f"{r['steady_speedup_vs_diffusers_fp32']:.2f}x | {r['to_return_s_per_step']:.3g} | "
              f"{r['to_return_speedup_vs_diffusers_fp32']:.2f}x |")


if __name__ == "__main__":
    main()

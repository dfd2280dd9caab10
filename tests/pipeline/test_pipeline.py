"""The generation pipeline on tiny real models: parity with diffusers, control semantics (scale,
start/end, modes, several nets), samplers, img2img, inpainting, outputs and bad input."""

import numpy as np
import pytest
import torch
from PIL import Image

from ctrlnet.base import load_base
from ctrlnet.models import ControlNet
from ctrlnet.pipeline import Control, Pipeline
from ctrlnet.pipeline.sampling import ActiveControl, control_residuals
from ctrlnet.pipeline.schedulers import SCHEDULERS
from ctrlnet.testbed.tiny import write_tiny_base


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe-bases")
    return {f: write_tiny_base(root / f, f) for f in ("sd15", "sd21", "sdxl")}


def trained_looking(base, seed=0, **config) -> ControlNet:
    """A ControlNet from the base's encoder with its zero convs moved off zero (as after training);
    ``config``: ControlNetConfig overrides."""
    net = ControlNet.from_unet(base.unet, conditioning_embedding_out_channels=(4, 8, 8, 8), **config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]:
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return net


def condition(size=64, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((size, size, 3)) > 0.7).astype(np.uint8) * 255


def count_batches(net):
    """Batch sizes the ControlNet's forward saw (a real forward hook, not a mock)."""
    seen = []
    net.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    return seen


@pytest.mark.parametrize("family, start, end, scale", [("sd15", 0.0, 1.0, 1.0), ("sd15", 0.25, 0.75, 0.5),
                                                        ("nano", 0.0, 1.0, 1.0)])
def test_latents_equal_diffusers_controlnet_pipeline(bases, tmp_path, family, start, end, scale):
    from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline
    from ctrlnet.formats import save_controlnet
    from ctrlnet.testbed import NANO_SD
    base = load_base(NANO_SD if family == "nano" else bases[family])
    size = base.unet.config.sample_size * 8
    net = trained_looking(base)
    save_controlnet(net, tmp_path / "net")
    theirs = ControlNetModel.from_pretrained(tmp_path / "net", local_files_only=True).eval()
    ref = StableDiffusionControlNetPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet, controlnet=theirs,
        scheduler=DDIMScheduler.from_config(base.scheduler.config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    cond = condition(size)
    pipe = Pipeline(base, {"net": net})
    ours = pipe(["a red circle", "a blue square"], controls=[Control("net", cond, scale=scale, start=start, end=end)],
                steps=4, guidance=7.5, guidance_rescale=0.0, seed=3, scheduler="ddim", output_type="latent").latents
    from ctrlnet.pipeline.sampling import initial_noise
    noise = initial_noise((4, size // 8, size // 8), 2, 3)
    expected = ref(["a red circle", "a blue square"], image=Image.fromarray(cond), num_inference_steps=4,
                   guidance_scale=7.5, latents=noise, controlnet_conditioning_scale=scale,
                   control_guidance_start=start, control_guidance_end=end, output_type="latent").images
    plain = pipe(["a red circle", "a blue square"], steps=4, guidance=7.5, guidance_rescale=0.0, seed=3,
                 output_type="latent").latents
    assert (ours - plain).abs().max() > 1e-3  # the control does something
    assert (ours - expected).abs().max() <= 1e-4
    assert pipe.packed is not None and pipe.packed.last_packed > 0  # on the CPU in fp32: through packed weights


def test_start_end_scale_zero_and_control_mode_skip_work(bases):
    base = load_base(bases["sd15"])
    net = trained_looking(base)
    pipe = Pipeline(base, {"net": net})
    seen = count_batches(net)
    pipe("a circle", controls=[Control("net", condition(), end=0.5)], steps=8, guidance=5.0)
    assert seen == [2] * 4  # active for steps 0..3 of 8 only, CFG halves batched
    seen.clear()
    pipe("a circle", controls=[Control("net", condition(), scale=0.0)], steps=4, guidance=5.0)
    assert seen == []  # scale 0: never run
    seen.clear()
    pipe("a circle", controls=[Control("net", condition(), mode="control")], steps=4, guidance=5.0)
    assert seen == [1] * 4  # conditional half only


def test_control_modes_and_summed_nets(bases):
    base = load_base(bases["sd15"])
    a, b = trained_looking(base, 0), trained_looking(base, 1)
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(4, 77, 12, generator=torch.Generator().manual_seed(1))
    cond = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    ha, hb = a.embed_condition(cond), b.embed_condition(cond)
    with torch.no_grad():
        down, mid = control_residuals([ActiveControl(a, ha, mode="control")], 0, 1, x, 500, text, None, uncond_rows=2)
        assert all((d[:2] == 0).all() for d in down) and (mid[:2] == 0).all()  # no control on the uncond half
        soft = a(x[2:], 500, text[2:], hint=ha, guess_mode=True)
        assert all(torch.allclose(d[2:], s, atol=1e-6) for d, s in zip(down, soft[0]))
        down_p, _ = control_residuals([ActiveControl(a, ha, mode="prompt")], 0, 1, x, 500, text, None, uncond_rows=2)
        n = len(down_p)
        flat = a(x, 500, text, hint=torch.cat([ha, ha]))[0]
        for i in (0, n - 1):  # soft scales 0.825**(12-i) on both halves
            assert torch.allclose(down_p[i], flat[i] * 0.825 ** (n - i), atol=1e-6)
        both = control_residuals([ActiveControl(a, ha), ActiveControl(b, hb, scale=0.5)], 0, 1, x, 500, text, None,
                                 uncond_rows=2)
        ra = a(x, 500, text, hint=torch.cat([ha, ha]))
        rb = b(x, 500, text, hint=torch.cat([hb, hb]), conditioning_scale=0.5)
        assert torch.allclose(both[1], ra[1] + rb[1], atol=1e-6)


@pytest.mark.parametrize("family", ["sd21", "sdxl"])
def test_other_families(bases, family):
    base = load_base(bases[family])
    net = trained_looking(base)
    pipe = Pipeline(base, {"net": net})
    res = pipe("a red circle", controls=[Control("net", condition())], steps=3, guidance=3.0, num_images=2)
    plain = pipe("a red circle", steps=3, guidance=3.0, num_images=2)
    assert len(res.images) == 2 and res.images[0].size == (64, 64)
    assert not np.array_equal(np.asarray(res.images[0]), np.asarray(plain.images[0])) or \
        (res.latents - plain.latents).abs().max() > 1e-4


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_scheduler_runs_and_is_reproducible(bases, name):
    pipe = Pipeline(load_base(bases["sd15"]))
    a = pipe("a red circle", steps=3, guidance=3.0, scheduler=name, seed=1, output_type="latent").latents
    b = pipe("a red circle", steps=3, guidance=3.0, scheduler=name, seed=1, output_type="latent").latents
    assert torch.isfinite(a).all() and torch.equal(a, b)
    with pytest.raises(ValueError, match="unknown scheduler 'heunn'"):
        pipe("x", steps=1, scheduler="heunn")


def test_img2img_and_inpainting(bases):
    base = load_base(bases["sd15"])
    pipe = Pipeline(base)
    init = np.zeros((64, 64, 3), np.uint8)
    init[16:48, 16:48] = (200, 40, 40)
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255
    from ctrlnet.pipeline.sampling import encode_image
    x = torch.from_numpy(init).permute(2, 0, 1)[None].float() / 127.5 - 1
    init_latents = encode_image(base, x)
    light = pipe("a red square", init_image=init, strength=0.25, steps=8, seed=0, output_type="latent").latents
    full = pipe("a red square", init_image=init, strength=1.0, steps=8, seed=0, output_type="latent").latents
    assert (light - init_latents).abs().mean() < (full - init_latents).abs().mean()
    res = pipe("a red square", init_image=init, mask=mask, steps=4, seed=0, output_type="latent")
    lat = res.latents
    assert torch.equal(lat[..., :4], init_latents[..., :4])  # kept half: the init image's latents exactly
    assert not torch.equal(lat[..., 4:], init_latents[..., 4:])
    # The inpaint ControlNet's condition: the init image with masked pixels at -1.
    cond = pipe.condition_map(Control("x", annotator="inpaint"), None, 64, 64, init, (mask > 0).astype(np.float32))
    assert (cond[:, 32:] == -1).all() and np.allclose(cond[20, 20], np.array([200, 40, 40]) / 255)
    with pytest.raises(ValueError, match="mask needs an init image"):
        pipe("x", mask=mask, steps=1)


def test_png_parameters_and_grid(bases, tmp_path):
    from ctrlnet.images import save_png
    from ctrlnet.pipeline.controlled import grid
    base = load_base(bases["sd15"])
    pipe = Pipeline(base, {"canny-net": trained_looking(base)})
    res = pipe("a red circle", controls=[Control("canny-net", condition(), end=0.8, mode="prompt")],
               negative_prompt="blurry", steps=2, guidance=3.0, seed=7, scheduler="euler_a")
    path = save_png(res.images[0], tmp_path / "a.png", res.parameters[0])
    text = Image.open(path).text["parameters"]
    assert text.startswith("a red circle\nNegative prompt: blurry\nSteps: 2, Sampler: Euler a, CFG scale: 3.0, Seed: 7")
    assert "Model: canny-net" in text and "Guidance End: 0.8" in text and "My prompt is more important" in text
    g = np.asarray(Image.open(grid(res, tmp_path / "grid.png")))
    assert g.shape == (64, 128, 3)


def test_bad_input_is_named(bases, tmp_path):
    sdxl = load_base(bases["sdxl"])
    other = trained_looking(load_base(bases["sd15"]))
    with pytest.raises(ValueError, match="does not fit the base.*cross-attention width 12 vs the base's 20"):
        Pipeline(sdxl, {"sd15-net": other})
    pipe = Pipeline(load_base(bases["sd15"]), {"net": other})
    with pytest.raises(ValueError, match="missing.png: no such image file"):
        pipe("x", controls=[Control("net", str(tmp_path / "missing.png"))], steps=1)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="bad.png: cannot decode image"):
        pipe("x", controls=[Control("net", str(tmp_path / "bad.png"))], steps=1)
    with pytest.raises(ValueError, match="unknown annotator 'hed'"):
        pipe("x", controls=[Control("net", condition(), annotator="hed")], steps=1)
    with pytest.raises(ValueError, match="mode 'strong'"):
        pipe("x", controls=[Control("net", condition(), mode="strong")], steps=1)
    with pytest.warns(UserWarning, match="402 tokens; the text encoder reads 16"):
        pipe("word " * 100, steps=1)


@pytest.fixture(scope="module")
def sd15_pipe(bases):
    base = load_base(bases["sd15"])
    return Pipeline(base, {"net": trained_looking(base)})


@pytest.mark.parametrize("kwargs, message", [
    ({"width": 0}, "width: 0 is not an integer in [1, 8192]"),  # used to give a 16 px image
    ({"height": -64}, "height: -64 is not an integer in [1, 8192]"),
    ({"width": 10_000}, "width: 10000 is not an integer in [1, 8192]"),
    ({"steps": 0}, "steps: 0 is not an integer in [1, 1000]"),
    ({"steps": 2.5}, "steps: 2.5 is not an integer in [1, 1000]"),
    ({"num_images": 0}, "num_images: 0 is not an integer in [1, 100]"),
    ({"num_images": 10 ** 6}, "num_images: 1000000 is not an integer in [1, 100]"),
    ({"guidance": float("nan")}, "guidance: nan is not a number in [0, 100]"),  # used to give black images
    ({"guidance": float("inf")}, "guidance: inf is not a number in [0, 100]"),
    ({"guidance": -1.0}, "guidance: -1.0 is not a number in [0, 100]"),
    ({"guidance_rescale": 1.5}, "guidance_rescale: 1.5 is not a number in [0, 1]"),
    ({"strength": 0.0}, "strength: 0.0 is not a number in (0, 1]"),
    ({"strength": float("nan")}, "strength: nan is not a number in (0, 1]"),
    ({"seed": -2}, "seed: -2 is not an integer in [-1, 4294967295]"),
    ({"seed": 2 ** 32}, "seed: 4294967296 is not an integer in [-1, 4294967295]"),
    ({"seed": 2 ** 32 - 1, "num_images": 2}, "seed: 4294967295 with 2 images runs past 4294967295"),
    ({"controls": [Control("net", condition(), scale=float("nan"))]},
     "control net: scale: nan is not a number in [0, 10]"),
    ({"controls": [Control("net", condition(), scale=[1.0] * 9 + [1e9])]}, "control net: scale: 1000000000.0 is not"),
    ({"controls": [Control("net", condition(), scale=[1.0, 2.0])]},
     "control net: conditioning_scale has 2 values; this ControlNet has"),
    ({"controls": [Control("net", condition(), start=-0.5)]}, "control net: start: -0.5 is not a number in [0, 1]"),
    ({"controls": [Control("net", condition(), end=float("nan"))]}, "control net: end: nan is not a number in [0, 1]"),
    ({"controls": [Control("net", condition(), start=0.8, end=0.2)]}, "need start <= end"),
])
def test_numbers_out_of_range_are_one_line_errors_naming_them(sd15_pipe, kwargs, message):
    with pytest.raises(ValueError) as e:
        sd15_pipe("x", **{"steps": 1, **kwargs})
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_seed_minus_one_draws_a_seed_and_records_it(sd15_pipe):
    """A1111's -1: a random seed, reported per image (Result.seeds, the parameters text), so the
    image can be made again."""
    a = sd15_pipe("x", seed=-1, steps=2, num_images=2, output_type="latent")
    first = a.seeds[0]
    assert a.seeds == [first, first + 1] and 0 <= first < 2 ** 32 - 1
    assert f"Seed: {first}," in a.parameters[0] and f"Seed: {first + 1}," in a.parameters[1]
    again = sd15_pipe("x", seed=first, steps=2, num_images=2, output_type="latent")
    assert again.seeds == a.seeds and torch.allclose(again.latents, a.latents, atol=1e-6)
    assert sd15_pipe("x", seed=5, steps=1, output_type="latent").seeds == [5]


def test_a_size_derived_from_an_extreme_aspect_is_capped(sd15_pipe):
    """The short side goes to the native size (64 here): a 1x256 image asks for 16384x64. Derived
    sizes are scaled down, aspect kept, to fit the caps and rounded down to the multiple (16);
    given sizes that do not fit are errors."""
    strip = np.zeros((1, 256, 3), np.uint8)
    assert sd15_pipe.output_size(None, None, strip) == (8192, 32)  # MAX_SIDE
    assert sd15_pipe.output_size(None, None, strip, max_side=1024, max_pixels=100_000) == (1024, 16)
    tall = np.zeros((300, 100, 3), np.uint8)  # 64 x 192: within the caps, rounded as before
    assert sd15_pipe.output_size(None, None, tall, max_side=1024) == (64, 192)
    assert sd15_pipe.output_size(None, None, tall, max_side=100) == (32, 96)
    with pytest.raises(ValueError, match=r"width x height: 2000x64 .* over the limit of 1024 px per side"):
        sd15_pipe.output_size(2000, 64, None, max_side=1024)
    with pytest.raises(ValueError, match="over the limit of 1024 px per side and 10,000 pixels"):
        sd15_pipe.output_size(128, None, None, max_side=1024, max_pixels=10_000)


def test_sizes_round_to_the_model_multiple(bases):
    pipe = Pipeline(load_base(bases["sd15"]))  # tiny: VAE 8x, one downsampler -> multiple 16
    assert pipe.size_multiple == 16
    assert pipe.output_size(70, 100, None) == (64, 96)
    wide = np.zeros((50, 100, 3), np.uint8)
    assert pipe.output_size(None, None, wide) == (128, 64)  # short side to native 64
    assert pipe("x", width=40, height=40, steps=1).images[0].size == (48, 48)


def test_one_condition_per_prompt_equals_separate_calls(bases):
    base = load_base(bases["sd15"])
    pipe = Pipeline(base, {"net": trained_looking(base)})
    a, b = condition(seed=1), condition(seed=2)
    both = pipe(["a red circle", "a blue square"], controls=[Control("net", [a, b])], steps=3, guidance=3.0, seed=4,
                num_images=2, output_type="latent")
    one = pipe("a blue square", controls=[Control("net", b)], steps=3, guidance=3.0, seed=6, num_images=2,
               output_type="latent")
    assert torch.allclose(both.latents[2:], one.latents, atol=1e-5)  # prompt 1's images: seeds 6, 7
    assert len(both.conditions[0]) == 2 and np.array_equal(both.conditions[0][1], b)
    with pytest.raises(ValueError, match="3 images for 2 prompts"):
        pipe(["x", "y"], controls=[Control("net", [a, b, a])], steps=1)


def test_channels_last_gives_the_same_latents(bases):
    """NHWC weights change the convolution kernels' memory layout, not the result."""
    latents = []
    for nhwc in (False, True):
        base = load_base(bases["sd15"])
        torch.manual_seed(0)  # the hint encoder's random init
        pipe = Pipeline(base, {"net": trained_looking(base)}, channels_last=nhwc)
        assert base.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last) == nhwc
        assert pipe.controlnets["net"].conv_in.weight.is_contiguous(memory_format=torch.channels_last) == nhwc
        latents.append(pipe("a circle", controls=[Control("net", condition())], steps=3, guidance=5.0, seed=1,
                            output_type="latent").latents)
    assert torch.allclose(latents[0], latents[1], atol=1e-4)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_packed_weights_give_the_same_latents(bases, family):
    """ctrlnet.prepack (the CPU fp32 default) changes kernels, not results; it can be turned off and
    is refused where it does not apply."""
    from ctrlnet import prepack
    if not prepack.available():
        pytest.skip("PyTorch built without oneDNN")
    latents = []
    for packed in (False, True):
        base = load_base(bases[family])
        torch.manual_seed(0)  # the hint encoder's random init
        pipe = Pipeline(base, {"net": trained_looking(base)}, packed_weights=packed)
        assert (pipe.packed is not None) == packed
        before = {k: v.clone() for k, v in [*base.unet.state_dict().items(),
                                            *pipe.controlnets["net"].state_dict().items()]}
        seen, sizes = [], []  # ids of the weights held packed during the loop; conv_in's storage then

        def on_step(i, pipe=pipe, base=base, seen=seen, sizes=sizes):
            seen.append({id(r()) for r, *_ in pipe.packed._cache.values()} if pipe.packed else set())
            sizes.append(base.unet.conv_in.weight.numel())
        latents.append(pipe("a circle", controls=[Control("net", condition())], steps=3, guidance=5.0, seed=1,
                            output_type="latent", callback=on_step).latents)
        assert (sizes[0] == 0) == packed  # in place: the plain storage is released during the loop
        after = [*base.unet.state_dict().items(), *pipe.controlnets["net"].state_dict().items()]
        assert all(torch.equal(before[k], v) for k, v in after)  # restored exactly after the loop
    assert seen[0] == seen[-1]  # packed at the first step, kept for the others
    # the UNet's and the ControlNet's convolutions, not the text encoder's weights (run once per call)
    assert id(base.unet.conv_in.weight) in seen[0] and id(pipe.controlnets["net"].conv_in.weight) in seen[0]
    assert not seen[0] & {id(p) for p in base.text_encoder.parameters()}
    assert pipe.packed.last_packed == len(seen[0]) and len(pipe.packed) == 0  # released after the call
    assert torch.allclose(latents[0], latents[1], atol=1e-4)
    assert Pipeline(load_base(bases[family]), dtype=torch.float32).packed is not None  # default: on
    base = load_base(bases[family]).to(dtype=torch.bfloat16)
    assert Pipeline(base, dtype=torch.bfloat16).packed is None  # bf16: plain kernels
    with pytest.raises(ValueError, match="packed_weights=True needs the CPU, fp32"):
        Pipeline(base, dtype=torch.bfloat16, packed_weights=True)


def test_compiled_models_give_the_same_latents(bases, monkeypatch):
    """compile=...: the loop calls the UNet and the ControlNet through torch.compile, each captured
    whole (no graph break), with the same latents; one graph per set of active nets, none new on the
    next call. The aot_eager backend (dynamo's capture and AOT tracing, no code generation) keeps this
    fast; inductor's code generation is PyTorch's own (BENCHMARKS.md measures it)."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    base = load_base(bases["sd15"])
    torch.manual_seed(0)  # the hint encoder's random init
    net = trained_looking(base)
    controls = [Control("net", condition(), end=0.5)]  # steps 0-1 with the net, 2-3 without

    def run(pipe, callback=None):
        return pipe("a circle", controls=controls, steps=4, guidance=5.0, seed=1, output_type="latent",
                    callback=callback).latents
    expected = run(Pipeline(base, {"net": net}))
    torch._dynamo.reset()
    counters.clear()
    import torch._inductor.config as inductor_config
    freezing = []  # on the CPU, inductor's freezing is on while the loop traces and runs, off after
    try:
        pipe = Pipeline(base, {"net": net}, compile={"backend": "aot_eager", "dynamic": False})
        assert pipe.packed is None
        got = run(pipe, callback=lambda i: freezing.append(inductor_config.freezing))
        graphs = counters["stats"]["unique_graphs"]
        again = run(pipe)
        assert counters["stats"]["unique_graphs"] == graphs == 3  # the net; the UNet with residuals; without
        assert not counters["graph_break"]
        assert pipe.compiled(base.unet) is pipe.compiled(base.unet) and pipe.compiled(base.unet)._orig_mod is base.unet
        pipe.remove_controlnet("net")  # unloading drops the net's compile wrapper too (it would keep the net alive)
        assert "net" not in pipe.controlnets and list(pipe._compiled) == [id(base.unet)]
    finally:
        torch._dynamo.reset()
    assert freezing == [True] * 4 and not inductor_config.freezing
    assert (got - expected).abs().max() <= 1e-5 and torch.equal(got, again)
    monkeypatch.setenv("CXX", "c++")  # the constructor's compiler check: nothing is compiled below
    default = Pipeline(base, compile=True)
    assert default.compile_kwargs == {"dynamic": False} and default.inductor_config == {"freezing": True}
    for compile in (True, {}):  # {}: torch.compile's own defaults, still compiled
        with pytest.raises(ValueError, match="packed_weights and compile exclude each other"):
            Pipeline(base, compile=compile, packed_weights=True)
    assert Pipeline(base, compile={}).packed is None


def test_compile_on_a_cpu_without_a_compiler_is_a_clear_error(bases, monkeypatch):
    """inductor's CPU kernels are C++: without a compiler the Pipeline says so up front, instead of
    failing mid-generation; other backends (no code generation) need none."""
    base = load_base(bases["sd15"])
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("CXX", raising=False)
    for compile in (True, {"mode": "max-autotune"}):
        with pytest.raises(ValueError, match="needs a C\\+\\+ compiler"):
            Pipeline(base, compile=compile)
    assert Pipeline(base, compile={"backend": "aot_eager"}).compile_kwargs == {"backend": "aot_eager"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_checks.sh runs it)")
@pytest.mark.parametrize("dtype, guidance, scheduler", [(torch.bfloat16, 5.0, "dpmpp_2m"), (torch.float32, 1.0, "pndm")])
def test_cuda_graphs_give_the_same_latents(bases, dtype, guidance, scheduler):
    """compile=True on CUDA (inductor, mode="reduce-overhead": CUDA graphs) gives the eager latents,
    a net active half the steps. Without CFG the prediction is the graph's own output buffer, and
    PNDM keeps past predictions: this case fails if the loop does not copy it out."""
    import torch._dynamo
    base = load_base(bases["sd15"])
    torch.manual_seed(0)
    net = trained_looking(base)
    base = base.to("cuda", dtype)
    latents = []
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        for compile in (False, True):
            pipe = Pipeline(base, {"net": net.to("cuda", dtype)}, dtype=dtype, compile=compile)
            for _ in range(2):  # the second call replays the recorded graphs
                out = pipe("a circle", controls=[Control("net", condition(), end=0.5)], steps=6, guidance=guidance,
                           seed=1, scheduler=scheduler, output_type="latent").latents.float().cpu()
            latents.append(out)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
        torch._dynamo.reset()
    assert torch.isfinite(latents[1]).all()
    tolerance = 0.02 if dtype == torch.bfloat16 else 1e-3
    assert (latents[1] - latents[0]).abs().mean() < tolerance * latents[0].abs().mean()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_checks.sh runs it)")
def test_cuda_latents_equal_cpu(bases):
    """The GPU path: the same pipeline and seed on CUDA (fp32, TF32 off) gives the CPU's latents;
    bf16 on CUDA stays finite and close."""
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        latents = {}
        for device, dtype in (("cpu", torch.float32), ("cuda", torch.float32), ("cuda", torch.bfloat16)):
            base = load_base(bases["sd15"])
            torch.manual_seed(0)  # the hint encoder's random init
            net = trained_looking(base)
            pipe = Pipeline(base.to(device, dtype), {"net": net}, dtype=dtype)
            assert pipe.controlnets["net"].conv_in.weight.device.type == device
            latents[device, dtype] = pipe("a circle", controls=[Control("net", condition())], steps=3, guidance=5.0,
                                          seed=1, output_type="latent").latents.float().cpu()
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    cpu = latents["cpu", torch.float32]
    assert torch.allclose(latents["cuda", torch.float32], cpu, atol=1e-3)
    bf16 = latents["cuda", torch.bfloat16]
    assert torch.isfinite(bf16).all() and (bf16 - cpu).abs().mean() < 0.1 * cpu.abs().mean()


@pytest.mark.parametrize("size", [None, 64])
def test_each_control_image_is_decoded_once(bases, tmp_path, monkeypatch, size):
    import ctrlnet.images
    base = load_base(bases["sd15"])
    pipe = Pipeline(base, {"net": trained_looking(base)})
    path = tmp_path / "edges.png"
    Image.fromarray(condition()).save(path)
    reads = []
    real = ctrlnet.images.read_image
    monkeypatch.setattr(ctrlnet.images, "read_image", lambda *a, **k: reads.append(a[0]) or real(*a, **k))
    pipe("x", controls=[Control("net", str(path))], steps=1, width=size, height=size, output_type="latent")
    assert reads == [path.as_posix()] or reads == [str(path)]

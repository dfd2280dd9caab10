"""The OpenVINO backend (``Pipeline(backend="openvino")``) on tiny real models: the same latents as
the torch path in f32 for everything the loop does (control modes, start/end, soft scales, several
nets, reuse, regions, img2img, both inpainting kinds, SDXL), the disk cache (read back, never stale),
the compiled-shape limit, bf16, the CLI and bad input. Real OpenVINO conversions, no mocks."""

import dataclasses

import numpy as np
import pytest
import torch

from ctrlnet.base import load_base
from ctrlnet.models import ControlNet
from ctrlnet.pipeline import Control, Pipeline, Region
from ctrlnet.testbed.tiny import tiny_unet_config, write_tiny_base

ov = pytest.importorskip("openvino", reason="the openvino extra (make test installs it)")

from ctrlnet.pipeline.openvino import OpenVINOBackend, residual_shapes, weights_digest  # noqa: E402
from pipeline.test_pipeline import condition, trained_looking as trained_looking_unseeded  # noqa: E402

ATOL = 1e-4  # f32: OpenVINO's kernels against PyTorch's (seen: ~3e-6)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("ov-bases")
    return {f: write_tiny_base(root / f, f) for f in ("sd15", "sd21", "sdxl")}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ov-cache")


def trained_looking(base, seed=0, **config) -> ControlNet:
    """test_pipeline's net, its hint encoder's random init seeded too: the same net in both pipelines."""
    torch.manual_seed(seed)
    return trained_looking_unseeded(base, seed, **config)


def pair(path, cache, nets=1, **backend):
    """(torch pipeline, OpenVINO pipeline) over the same weights (separate copies of the base)."""
    pipes = []
    for kind in ("torch", "openvino"):
        base = load_base(path)
        named = {f"net{i}": trained_looking(base, seed=i) for i in range(nets)}
        named["shuffle"] = trained_looking(base, seed=5, global_pool_conditions=True)  # residuals averaged
        chosen = OpenVINOBackend(cache_dir=cache, **backend) if kind == "openvino" else "torch"
        pipes.append(Pipeline(base, named, backend=chosen, packed_weights=False if kind == "torch" else None))
    return pipes


def same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert (a - b).abs().max().item() < ATOL, (a - b).abs().max().item()


CASES = {
    "balanced": dict(controls=lambda: [Control("net0", condition())]),
    # control mode: the net on the conditional half; end: inactive (zero residuals) at the last steps
    "control mode, end=0.5": dict(controls=lambda: [Control("net0", condition(), mode="control", end=0.5)]),
    "prompt mode, per-residual scales": dict(controls=lambda: [Control("net0", condition(), mode="prompt",
                                                                       scale=[0.2 * i for i in range(7)])]),
    "two nets, reuse, no CFG": dict(controls=lambda: [Control("net0", condition(seed=0), every=2, start=0.2),
                                                      Control("net1", condition(seed=1), scale=0.7)], guidance=1.0),
    "a shuffle-style net (pooled residuals)": dict(controls=lambda: [Control("shuffle", condition(), scale=0.8)]),
    "regions, two images per prompt": dict(
        controls=lambda: [Control("net0", condition())], num_images=2,
        regions=lambda: [Region("a blue square", np.pad(np.full((64, 32), 255, np.uint8), ((0, 0), (32, 0))))]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_same_latents_as_torch_in_f32(bases, cache, case):
    spec = dict(CASES[case])
    torch_pipe, ov_pipe = pair(bases["sd15"], cache, nets=2)
    controls = spec.pop("controls")
    regions = spec.pop("regions", lambda: ())
    kw = dict(dict(steps=4, guidance=5.0, seed=3, output_type="latent"), **spec)
    a = torch_pipe("a red circle", controls=controls(), regions=regions(), **kw).latents
    b = ov_pipe("a red circle", controls=controls(), regions=regions(), **kw).latents
    same(a, b)


def test_img2img_inpainting_and_decoding(bases, cache):
    torch_pipe, ov_pipe = pair(bases["sd15"], cache)
    init = np.zeros((64, 64, 3), np.uint8)
    init[16:48, 16:48] = (200, 40, 40)
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255
    for kw in (dict(init_image=init, strength=0.5), dict(init_image=init, mask=mask)):
        a = torch_pipe("a red square", controls=[Control("net0", condition())], steps=4, seed=0, **kw)
        b = ov_pipe("a red square", controls=[Control("net0", condition())], steps=4, seed=0, **kw)
        same(a.latents, b.latents)
        # the VAE decoder through OpenVINO: the same uint8 image within a rounding step
        diff = np.abs(np.asarray(a.images[0]).astype(int) - np.asarray(b.images[0]).astype(int))
        assert diff.max() <= 1, diff.max()
    assert {c.kind for c in ov_pipe.openvino.converted()} == {"unet", "controlnet", "vae-decoder"}


def test_nine_channel_inpainting_unet(bases, cache):
    """An inpainting base (UNet with mask and masked-image latents concatenated: 9 channels)."""
    from diffusers import UNet2DConditionModel
    pipes = []
    for backend in ("torch", "openvino"):
        base = load_base(bases["sd15"])
        net = trained_looking(base)  # a 4-channel ControlNet, as the inpainting base's family uses
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**{**tiny_unet_config("sd15"), "in_channels": 9}).eval().requires_grad_(False)
        base = dataclasses.replace(base, unet=unet)
        chosen = OpenVINOBackend(cache_dir=cache) if backend == "openvino" else "torch"
        pipes.append(Pipeline(base, {"net0": net}, packed_weights=False if backend == "torch" else None,
                              backend=chosen))
    init = np.full((64, 64, 3), 120, np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    kw = dict(controls=[Control("net0", condition())], init_image=init, mask=mask, steps=3, seed=1,
              output_type="latent")
    same(pipes[0]("a cat", **kw).latents, pipes[1]("a cat", **kw).latents)


@pytest.mark.parametrize("family", ["sd21", "sdxl"])
def test_other_families(bases, cache, family):
    """SD2.x (linear projections, v-prediction) and SDXL (added text / time embeddings as graph inputs)."""
    torch_pipe, ov_pipe = pair(bases[family], cache)
    kw = dict(controls=[Control("net0", condition(), mode="control")], steps=3, guidance=4.0, seed=2,
              output_type="latent")
    same(torch_pipe("a red circle", **kw).latents, ov_pipe("a red circle", **kw).latents)


def test_cache_is_read_back_and_never_stale(bases, cache):
    _, ov_pipe = pair(bases["sd15"], cache)
    kw = dict(controls=[Control("net0", condition())], steps=2, seed=0, output_type="latent")
    first = ov_pipe("a circle", **kw).latents
    # a new backend with freshly loaded models: every model read from the cache folders, none converted
    base = load_base(bases["sd15"])
    again = Pipeline(base, {"net0": trained_looking(base)}, backend=OpenVINOBackend(cache_dir=cache))
    same(first, again("a circle", **kw).latents)
    folders = {c.kind: c.folder for c in again.openvino.converted()}
    assert not any(c.converted for c in again.openvino.converted())
    assert all((f / "model.xml").is_file() and (f / "model.bin").is_file() for f in folders.values())
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no half-written temporary folders
    assert all(f.stat().st_mode & 0o777 == 0o755 for f in folders.values())  # readable by every user of the cache
    # weights changed in place: after reset_backend the net converts again, into another folder,
    # and its output follows the new weights (the torch path's with the same change)
    net = again.controlnets["net0"]
    with torch.no_grad():
        net.controlnet_mid_block.weight.mul_(3.0)
    stale = again("a circle", **kw).latents  # without a reset the converted model keeps the old weights
    same(stale, first)
    again.reset_backend()
    changed = again("a circle", **kw).latents
    redone = {c.kind: c for c in again.openvino.converted()}
    assert redone["controlnet"].converted and redone["controlnet"].folder != folders["controlnet"]
    assert not redone["unet"].converted and redone["unet"].folder == folders["unet"]
    reference = Pipeline(load_base(bases["sd15"]), {"net0": net}, packed_weights=False)
    same(changed, reference("a circle", **kw).latents)
    assert (changed - first).abs().max() > 1e-3


def test_compiled_shapes_are_bounded(bases, cache):
    torch_pipe, ov_pipe = pair(bases["sd15"], cache, max_shapes=1)
    for size in (64, 96, 64):
        kw = dict(controls=[Control("net0", condition(size))], steps=2, seed=0, width=size, height=size,
                  output_type="latent")
        same(torch_pipe("a circle", **kw).latents, ov_pipe("a circle", **kw).latents)
    assert all(len(c.compiled) == 1 for c in ov_pipe.openvino.converted())


def test_residual_shapes_match_the_controlnet(bases):
    """The zeros fed to the UNet at steps without control have the residuals' shapes (odd sizes too)."""
    base = load_base(bases["sd15"])
    net = trained_looking(base)
    for h, w in ((8, 8), (10, 6)):
        x = torch.randn(2, 4, h, w)
        hint = torch.randn(2, net.config.block_out_channels[0], h, w)
        down, mid = net(x, 10, torch.randn(2, 77, base.unet.config.cross_attention_dim), hint=hint)
        assert residual_shapes(base.unet.config, 2, h, w) == [tuple(r.shape) for r in (*down, mid)]


def test_bf16_precision_runs_close_to_f32(bases, cache, monkeypatch):
    torch_pipe, _ = pair(bases["sd15"], cache)
    monkeypatch.setenv("CTRLNET_OPENVINO_CACHE", str(cache))
    base = load_base(bases["sd15"], dtype=torch.bfloat16)  # a bf16 base: cast to fp32 for the torch side
    bf16 = Pipeline(base, {"net0": trained_looking(load_base(bases["sd15"]))}, dtype=torch.bfloat16,
                    backend="openvino")
    assert bf16.dtype == torch.float32 and base.unet.dtype == torch.float32 and base.vae.dtype == torch.float32
    assert bf16.controlnets["net0"].dtype == torch.float32
    assert bf16.openvino.properties["INFERENCE_PRECISION_HINT"] == "bf16"
    assert bf16.openvino.cache_dir == cache
    loaded = Pipeline.from_pretrained(bases["sd15"], dtype="bf16", backend="openvino")
    assert loaded.base.unet.dtype == torch.float32 and loaded.openvino.precision == torch.bfloat16
    kw = dict(controls=[Control("net0", condition())], steps=3, seed=0, output_type="latent")
    a, b = torch_pipe("a circle", **kw).latents, bf16("a circle", **kw).latents
    assert torch.isfinite(b).all()
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    assert cos > 0.99, cos


def test_bad_input(bases, cache, monkeypatch):
    base = load_base(bases["sd15"])
    with pytest.raises(ValueError, match="backend 'tensorrt': use one of torch, openvino"):
        Pipeline(base, backend="tensorrt")
    with pytest.raises(ValueError, match=r"backend openvino: compile \(--compile\) does not apply"):
        Pipeline(base, backend="openvino", compile=True)
    with pytest.raises(ValueError, match=r"backend openvino: compile \(--compile\) does not apply"):
        Pipeline.from_pretrained("/nonexistent/base", backend="openvino", compile={})  # before loading
    with pytest.raises(ValueError, match="backend openvino: packed_weights does not apply"):
        Pipeline(base, backend="openvino", packed_weights=True)
    with pytest.raises(ValueError, match="the backend's precision applies"):
        Pipeline(base, dtype=torch.bfloat16, backend=OpenVINOBackend(torch.float32, cache_dir=cache))
    with pytest.raises(ValueError, match="the backend's precision applies"):  # before loading, too
        Pipeline.from_pretrained("/nonexistent/base", dtype="bf16", backend=OpenVINOBackend(cache_dir=cache))
    with pytest.raises(ValueError, match="dtype 'fp8': use fp32, bf16 or fp16"):
        Pipeline.from_pretrained(bases["sd15"], dtype="fp8", backend="openvino")
    with pytest.raises(ValueError, match="backend openvino: dtype fp16 is not supported; use fp32 or bf16"):
        Pipeline.from_pretrained(bases["sd15"], dtype="fp16", backend="openvino")
    with pytest.raises(ValueError, match="backend openvino runs on the CPU, not cuda"):
        Pipeline.from_pretrained(bases["sd15"], device="cuda", backend="openvino")
    with pytest.raises(ValueError, match="max_shapes: 0"):
        OpenVINOBackend(max_shapes=0)


def test_digest_is_the_same_in_every_process(bases):
    """The cache key depends on the weights and the code, not on the process (diffusers' config keeps
    a set-ordered list of defaults) or on the folder a model was loaded from."""
    import shutil
    import subprocess
    import sys
    other = bases["sd15"].parent / "sd15-copy"
    if not other.exists():
        shutil.copytree(bases["sd15"], other)
    script = ("import sys; from ctrlnet.base import load_base; from ctrlnet.pipeline.openvino import weights_digest; "
              "b = load_base(sys.argv[1]); print(weights_digest(b.unet, 'unet'), weights_digest(b.vae, 'vae'))")
    digests = {subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, check=True,
                              env={**__import__("os").environ, "PYTHONHASHSEED": seed}).stdout.strip()
               for path, seed in ((bases["sd15"], "1"), (bases["sd15"], "2"), (other, "3"))}
    assert len(digests) == 1, digests
    base = load_base(bases["sd15"])
    assert digests == {f"{weights_digest(base.unet, 'unet')} {weights_digest(base.vae, 'vae')}"}
    with torch.no_grad():
        base.unet.conv_out.bias.add_(1e-6)
    assert weights_digest(base.unet, "unet") not in next(iter(digests))


def test_cli_generate_with_openvino(bases, cache, tmp_path, monkeypatch, capsys):
    from ctrlnet import cli
    from ctrlnet.formats import save_controlnet
    monkeypatch.setattr(cli, "retain_freed_memory", lambda: None)  # process-wide: not in the test process
    monkeypatch.setenv("CTRLNET_OPENVINO_CACHE", str(cache))
    base = load_base(bases["sd15"])
    save_controlnet(trained_looking(base), tmp_path / "net")
    from PIL import Image
    Image.fromarray(condition()).save(tmp_path / "cond.png")
    common = ["--base", str(bases["sd15"]), "--steps", "2", "--seed", "4"]
    for backend in ("torch", "openvino"):
        assert cli.main(["generate", "--prompt", "a circle", "--control", f"model={tmp_path / 'net'},"
                         f"image={tmp_path / 'cond.png'}", *common, "--backend", backend,
                         "--out", str(tmp_path / f"{backend}.png")]) == 0
    a, b = (np.asarray(Image.open(tmp_path / f"{k}.png")).astype(int) for k in ("torch", "openvino"))
    assert np.abs(a - b).max() <= 1
    assert any(p.name.startswith("unet-") for p in cache.iterdir())
    assert cli.main(["generate", "--prompt", "x", *common, "--backend", "openvino", "--dtype", "fp16",
                     "--out", str(tmp_path / "x.png")]) == 2
    assert "dtype fp16 is not supported; use fp32 or bf16" in capsys.readouterr().err


def test_server_takes_the_backend(bases):
    from ctrlnet.serve.config import ServeConfig
    from ctrlnet.serve.server import Server
    server = Server(ServeConfig(base=str(bases["sd15"]), backend="openvino", dtype="bf16"))
    assert server.pipe.backend == "openvino" and server.pipe.openvino.precision == torch.bfloat16
    assert server.pipe.dtype == torch.float32 and server.pipe.base.unet.dtype == torch.float32

"""Generation with every kind of control network: Union ControlNets, Control-LoRAs and T2I-Adapters,
against diffusers' own pipelines where it has one (latents within 1e-4), and mixed together."""

import numpy as np
import pytest
import torch
from diffusers import (ControlNetUnionModel, DDIMScheduler, StableDiffusionAdapterPipeline,
                       StableDiffusionXLAdapterPipeline, StableDiffusionXLControlNetUnionPipeline, T2IAdapter)
from PIL import Image

from ctrlnet.base import load_base
from ctrlnet.formats import save_controlnet
from ctrlnet.formats.adapter_io import save_adapter
from ctrlnet.models.control_lora import ControlLoRA
from ctrlnet.models.union import ControlNetUnion
from ctrlnet.pipeline import Control, Pipeline
from ctrlnet.pipeline.sampling import initial_noise
from ctrlnet.pipeline.text import guidance_text
from ctrlnet.testbed.tiny import write_tiny_base
from pipeline.test_pipeline import condition

PROMPTS = ["a red circle", "a blue square"]
NEGATIVE = "blurry"


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("kind-bases")
    return {f: write_tiny_base(root / f, f) for f in ("sd15", "sdxl")}


def moved_off_zero(net, seed=0, std=0.3):
    """The zero-initialised parts given values, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out",
                                "spatial_ch_projs")) or name.endswith(".up"):
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return net


def union_net(base, types=6):
    net = ControlNetUnion.from_unet(base.unet, num_control_type=types, num_trans_head=2,
                                    conditioning_embedding_out_channels=(4, 8, 8, 8))
    return moved_off_zero(net).eval()


def random_adapter(base, seed=0):
    xl = base.unet.config.addition_embed_type == "text_time"
    torch.manual_seed(seed)
    adapter = T2IAdapter(in_channels=3, channels=[8, 16, 16, 16], num_res_blocks=2, downscale_factor=16 if xl else 8,
                         adapter_type="full_adapter_xl" if xl else "full_adapter")
    return adapter.eval()


def sdxl_embeds(base, size):
    """diffusers' SDXL pipelines get our exact text embeddings (their encode_prompt is not under test)."""
    text, added = guidance_text(base, PROMPTS, NEGATIVE, True, size, size)
    b = len(PROMPTS)
    return dict(prompt_embeds=text[b:], negative_prompt_embeds=text[:b],
                pooled_prompt_embeds=added["text_embeds"][b:], negative_pooled_prompt_embeds=added["text_embeds"][:b])


def ours(pipe, controls, **kw):
    return pipe(PROMPTS, controls=controls, negative_prompt=NEGATIVE, steps=4, guidance=7.5, guidance_rescale=0.0,
                seed=3, scheduler="ddim", output_type="latent", **kw).latents


# ---------------------------------------------------------------- parity with diffusers

@pytest.mark.parametrize("pairs, scale", [(1, 0.7), (2, 1.0)])
def test_union_latents_equal_diffusers_union_sdxl_pipeline(bases, tmp_path, pairs, scale):
    base = load_base(bases["sdxl"])
    size = 64
    net = union_net(base)
    save_controlnet(net, tmp_path / "union")
    theirs = ControlNetUnionModel.from_pretrained(tmp_path / "union", local_files_only=True).eval()
    ref = StableDiffusionXLControlNetUnionPipeline(
        vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2, tokenizer=base.tokenizer,
        tokenizer_2=base.tokenizer_2, unet=base.unet, controlnet=theirs,
        scheduler=DDIMScheduler.from_config(base.scheduler.config), add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    images, types = [condition(size, 0), condition(size, 1)][:pairs], ["canny", "depth"][:pairs]
    pipe = Pipeline(base, {"union": net})
    control = Control("union", images if pairs > 1 else images[0], type=types if pairs > 1 else types[0], scale=scale)
    got = ours(pipe, [control])
    expected = ref(control_image=[Image.fromarray(im) for im in images], control_mode=[3, 1][:pairs], num_inference_steps=4,
                   guidance_scale=7.5, latents=initial_noise((4, size // 8, size // 8), 2, 3), height=size, width=size,
                   controlnet_conditioning_scale=scale, output_type="latent", **sdxl_embeds(base, size)).images
    plain = ours(pipe, [])
    assert (got - plain).abs().max() > 1e-3  # the control does something
    assert (got - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("family, end", [("sd15", 1.0), ("sdxl", 1.0), ("sdxl", 0.5)])
def test_adapter_latents_equal_diffusers_adapter_pipelines(bases, tmp_path, family, end):
    base = load_base(bases[family])
    size = 64
    adapter = random_adapter(base)
    save_adapter(adapter, tmp_path / "adapter")
    theirs = T2IAdapter.from_pretrained(tmp_path / "adapter").eval()
    sched = DDIMScheduler.from_config(base.scheduler.config)
    cond = condition(size)
    noise = initial_noise((4, size // 8, size // 8), 2, 3)
    common = dict(image=[Image.fromarray(cond)] * len(PROMPTS), num_inference_steps=4, guidance_scale=7.5, latents=noise,
                  height=size, width=size, adapter_conditioning_scale=0.8, output_type="latent")
    if family == "sdxl":
        ref = StableDiffusionXLAdapterPipeline(
            vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2,
            tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, unet=base.unet, adapter=theirs, scheduler=sched)
        ref.set_progress_bar_config(disable=True)
        expected = ref(adapter_conditioning_factor=end, **common, **sdxl_embeds(base, size)).images
    else:
        ref = StableDiffusionAdapterPipeline(
            vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet, adapter=theirs,
            scheduler=sched, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        ref.set_progress_bar_config(disable=True)
        expected = ref(PROMPTS, negative_prompt=[NEGATIVE] * len(PROMPTS), **common).images
    pipe = Pipeline(base)
    seen = []
    loaded = pipe.controlnet(tmp_path / "adapter")
    loaded.register_forward_hook(lambda m, args, out: seen.append(1))
    got = ours(pipe, [Control(str(tmp_path / "adapter"), cond, scale=0.8, end=end)])
    assert seen == [1]  # the adapter ran once for the whole generation
    plain = ours(pipe, [])
    assert (got - plain).abs().max() > 1e-3
    assert (got - expected).abs().max() <= 1e-4


# ---------------------------------------------------------------- Control-LoRA, mixed units, semantics

def test_control_lora_generates_as_its_merged_controlnet(bases, tmp_path):
    base = load_base(bases["sd15"])
    lora = moved_off_zero(ControlLoRA.from_unet(base.unet, rank=2, conditioning_embedding_out_channels=(4, 8, 8, 8)))
    full = lora.to_controlnet()
    pipe = Pipeline(base, {"lora": lora, "full": full})
    cond = condition()
    a = ours(pipe, [Control("lora", cond, scale=0.9)])
    b = ours(pipe, [Control("full", cond, scale=0.9)])
    assert (a - b).abs().max() <= 1e-4 and (a - ours(pipe, [])).abs().max() > 1e-3
    assert all(m._merged is None for _, m in lora.lora_layers())  # the merged weights were dropped after the call
    assert lora.tied_to(base.unet) and lora.down_blocks[0].resnets[0].conv1.weight is \
        base.unet.down_blocks[0].resnets[0].conv1.weight  # still the base's own tensors after add_controlnet
    other = load_base(bases["sd15"])  # the same weights, other tensors: the net is not tied to them
    with pytest.raises(ValueError, match="built on another base's weights"):
        Pipeline(other, {"lora": lora})
    # a saved file, loaded through the pipeline on its base, gives the same
    from ctrlnet.formats.control_lora_io import save_control_lora
    path = save_control_lora(lora, tmp_path / "cl.safetensors")
    c = ours(pipe, [Control(str(path), cond, scale=0.9)])
    assert (c - a).abs().max() <= 1e-5


def test_union_runs_its_trunk_once_for_all_pairs_and_checks_types(bases):
    base = load_base(bases["sdxl"])
    net = union_net(base, types=8)
    pipe = Pipeline(base, {"union": net})
    seen = []
    net.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    two = ours(pipe, [Control("union", [condition(seed=0), condition(seed=1)], type=["canny", "tile"])])
    assert seen == [4] * 4  # one trunk pass per step (CFG rows 2 x 2 prompts) for both pairs
    one = ours(pipe, [Control("union", condition(seed=0), type="canny")])
    assert (two - one).abs().max() > 1e-4
    for control, message in [
            (Control("union", condition()), "needs type="),
            (Control("union", condition(), type="nope"), "not one of this 8-type"),
            (Control("union", [condition()], type=["canny", "depth"]), "2 types need 2 images")]:
        with pytest.raises(ValueError, match=message):
            ours(pipe, [control])
    res = pipe(PROMPTS[0], controls=[Control("union", [condition(seed=0), condition(seed=1)], type=["canny", "tile"])],
               steps=1)
    assert "Type: canny+tile" in res.parameters[0] and len(res.conditions[0]) == 2


def test_mixed_units_act_together(bases):
    base = load_base(bases["sd15"])
    from ctrlnet.models import ControlNet
    cn = moved_off_zero(ControlNet.from_unet(base.unet, conditioning_embedding_out_channels=(4, 8, 8, 8)), seed=1)
    lora = moved_off_zero(ControlLoRA.from_unet(base.unet, rank=2, conditioning_embedding_out_channels=(4, 8, 8, 8)))
    adapter = random_adapter(base)
    pipe = Pipeline(base, {"cn": cn, "lora": lora, "adapter": adapter})
    units = {"cn": Control("cn", condition(seed=0)), "lora": Control("lora", condition(seed=1), scale=0.8),
             "adapter": Control("adapter", condition(seed=2), scale=0.5, mode="control")}
    together = ours(pipe, list(units.values()))
    plain = ours(pipe, [])
    for name in units:  # leaving out any one unit changes the result: all act
        rest = [u for k, u in units.items() if k != name]
        assert (ours(pipe, rest) - together).abs().max() > 1e-4
    assert (together - plain).abs().max() > 1e-3
    assert (ours(pipe, list(units.values())) - together).abs().max() == 0  # reproducible
    res = pipe(PROMPTS[0], controls=[units["adapter"]], steps=2)
    assert "Model: adapter" in res.parameters[0]
    with pytest.raises(ValueError, match="no per-residual soft scales"):
        ours(pipe, [Control("adapter", condition(), mode="prompt")])
    with pytest.raises(ValueError, match="type= applies to Union"):
        ours(pipe, [Control("cn", condition(), type="canny")])


def test_adapter_for_another_base_is_refused(bases):
    sd15, sdxl = load_base(bases["sd15"]), load_base(bases["sdxl"])
    pipe = Pipeline(sd15)
    with pytest.raises(ValueError, match="full_adapter_xl for an SD1.x"):
        pipe.add_controlnet("xl", random_adapter(sdxl))


def test_openvino_backend_refuses_other_kinds_clearly(bases):
    pytest.importorskip("openvino")
    base = load_base(bases["sd15"])
    pipe = Pipeline(base, backend="openvino")
    with pytest.raises(ValueError, match="backend openvino runs classic ControlNets; a t2i_adapter"):
        pipe.add_controlnet("a", random_adapter(base))
    assert np.isfinite(ours(pipe, []).numpy()).all()

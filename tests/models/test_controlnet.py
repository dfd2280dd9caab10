"""The ControlNet invariants (paper section 3; seed points 2-4), on tiny real UNets of each family."""

import pytest
import torch
import torch.nn.functional as F

from ctrlnet.configs import known_controlnet_config
from ctrlnet.models import ControlledUNet, ControlNet, sum_residuals
from ctrlnet.models.controlnet import SOFT_SCALE_BASE
from conftest import HINT_CHANNELS, make_inputs, randomize


def test_residuals_are_zero_and_base_unchanged_at_init(unet, controlnet):
    sample, t, text, cond, kw = make_inputs(unet)
    with torch.no_grad():
        down, mid = controlnet(sample, t, text, cond, **kw)
        controlled = ControlledUNet(unet, [controlnet])(sample, t, text, [cond], **kw)
        plain = unet(sample, t, text, **kw).sample
    assert len(down) + 1 == controlnet.config.num_residuals
    assert all(bool((d == 0).all()) for d in down) and bool((mid == 0).all())
    assert torch.equal(controlled, plain)  # bit for bit


def test_residual_shapes_match_the_unet_skips(unet, controlnet):
    sample, t, text, cond, kw = make_inputs(unet, size=16)
    with torch.no_grad():
        down, mid = controlnet(sample, t, text, cond, **kw)
    # The UNet's own skip tensors, captured by hooks on its down blocks.
    skips = []
    hooks = [b.register_forward_hook(lambda m, i, o: skips.extend(o[1])) for b in unet.down_blocks]
    hooks.append(unet.conv_in.register_forward_hook(lambda m, i, o: skips.insert(0, o)))
    with torch.no_grad():
        unet(sample, t, text, **kw)
    for h in hooks:
        h.remove()
    assert [d.shape for d in down] == [s.shape for s in skips]


def test_encoder_copy_starts_from_the_unet_weights(unet, controlnet):
    unet_sd = unet.state_dict()
    copied = [k for k in controlnet.state_dict() if k in unet_sd]
    assert len(copied) > 10
    assert all(torch.equal(controlnet.state_dict()[k], unet_sd[k]) for k in copied)


def test_one_step_trains_zero_convs_and_leaves_the_base_bit_identical(unet, controlnet):
    model = ControlledUNet(unet, [controlnet]).train()
    assert not unet.training and all(not p.requires_grad for p in unet.parameters())
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    sample, t, text, cond, kw = make_inputs(unet)
    loss = F.mse_loss(model(sample, t, text, [cond], **kw), torch.randn_like(sample))
    loss.backward()
    zero_layers = list(controlnet.controlnet_down_blocks) + [controlnet.controlnet_mid_block,
                                                            controlnet.controlnet_cond_embedding.conv_out]
    # dy/dw = x != 0 and dy/db = 1: every zero conv of the residual path gets a gradient at init.
    for layer in zero_layers[:-1]:
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
        assert layer.bias.grad.abs().sum() > 0
    assert all(p.grad is None for p in unet.parameters())
    torch.optim.AdamW(controlnet.parameters(), lr=1e-3).step()
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    assert all(layer.weight.abs().sum() > 0 for layer in zero_layers[:-1])


def test_residuals_equal_diffusers_controlnetmodel(unet, controlnet):
    from diffusers import ControlNetModel
    randomize(controlnet)
    reference = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=HINT_CHANNELS)
    reference.load_state_dict(controlnet.state_dict(), strict=True)
    sample, t, text, cond, kw = make_inputs(unet)
    with torch.no_grad():
        down, mid = controlnet(sample, t, text, cond, conditioning_scale=0.7, **kw)
        ref_down, ref_mid = reference(sample, t, text, cond, conditioning_scale=0.7, return_dict=False, **kw)
    assert max((a - b).abs().max().item() for a, b in zip(down, ref_down)) <= 1e-5
    assert (mid - ref_mid).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name,params,unet_params", [("sd15", 361_279_120, 859_520_964),
                                                      ("sd21", 364_228_240, 865_910_724)])
def test_parameter_counts_of_full_configs(name, params, unet_params):
    from diffusers import UNet2DConditionModel
    from ctrlnet.configs import known_base_unet_config
    with torch.device("meta"):
        net = ControlNet(known_controlnet_config(name))
        base = UNet2DConditionModel.from_config(known_base_unet_config(name))
    assert sum(p.numel() for p in net.parameters()) == params
    assert sum(p.numel() for p in base.parameters()) == unet_params
    assert len(net.state_dict()) == 340
    assert net.config.num_residuals == 13
    hint = sum(p.numel() for p in net.controlnet_cond_embedding.parameters())
    zero = sum(p.numel() for m in [*net.controlnet_down_blocks, net.controlnet_mid_block] for p in m.parameters())
    if name == "sd15":  # REFERENCE.md section 1
        assert (hint, zero) == (1_086_480, 11_479_680)


def test_per_residual_scales_guess_mode_and_global_pool(unet, controlnet):
    randomize(controlnet)
    sample, t, text, cond, kw = make_inputs(unet)
    n = controlnet.config.num_residuals
    with torch.no_grad():
        down, mid = controlnet(sample, t, text, cond, **kw)
        scales = [0.1 * (i + 1) for i in range(n)]
        sdown, smid = controlnet(sample, t, text, cond, conditioning_scale=scales, **kw)
        gdown, gmid = controlnet(sample, t, text, cond, conditioning_scale=0.5, guess_mode=True, **kw)
    for i, (a, b) in enumerate(zip(down, sdown)):
        assert torch.allclose(a * scales[i], b, atol=1e-6)
    assert torch.allclose(mid * scales[-1], smid, atol=1e-6)
    for i, (a, b) in enumerate(zip(down, gdown)):
        assert torch.allclose(a * 0.5 * SOFT_SCALE_BASE ** (n - 1 - i), b, atol=1e-6)
    assert torch.allclose(mid * 0.5, gmid, atol=1e-6)
    with pytest.raises(ValueError, match="residuals"):
        controlnet(sample, t, text, cond, conditioning_scale=[1.0, 2.0], **kw)
    controlnet.config.global_pool_conditions = True
    with torch.no_grad():
        pdown, pmid = controlnet(sample, t, text, cond, **kw)
    assert all(p.shape[-2:] == (1, 1) for p in pdown) and pmid.shape[-2:] == (1, 1)
    assert torch.allclose(pmid, mid.mean(dim=(2, 3), keepdim=True), atol=1e-6)


def test_soft_scales_match_the_original_table():
    with torch.device("meta"):
        net = ControlNet(known_controlnet_config("sd15"))
    scales = net.residual_scales(1.0, soft=True)
    assert len(scales) == 13 and scales[-1] == 1.0 and abs(scales[0] - 0.825 ** 12) < 1e-12
    assert abs(scales[0] - 0.0994) < 1e-4


def test_several_controlnets_sum_their_residuals(unet):
    a = randomize(ControlNet.from_unet(unet, conditioning_embedding_out_channels=HINT_CHANNELS), seed=1)
    b = randomize(ControlNet.from_unet(unet, conditioning_embedding_out_channels=HINT_CHANNELS), seed=2)
    sample, t, text, cond, kw = make_inputs(unet)
    cond_b = torch.rand_like(cond)
    with torch.no_grad():
        both = ControlledUNet(unet, [a, b])(sample, t, text, [cond, cond_b], scales=[0.5, 1.5], **kw)
        ra = a(sample, t, text, cond, conditioning_scale=0.5, **kw)
        rb = b(sample, t, text, cond_b, conditioning_scale=1.5, **kw)
        down, mid = sum_residuals([ra, rb])
        expected = unet(sample, t, text, down_block_additional_residuals=list(down),
                        mid_block_additional_residual=mid, **kw).sample
        only_a = ControlledUNet(unet, [a, b])(sample, t, text, [cond, cond_b], scales=[0.5, 0.0], **kw)
        expected_a = unet(sample, t, text, down_block_additional_residuals=list(ra[0]),
                          mid_block_additional_residual=ra[1], **kw).sample
    assert torch.allclose(both, expected, atol=1e-6)
    assert not torch.allclose(both, unet(sample, t, text, **kw).sample, atol=1e-4)
    assert torch.equal(only_a, expected_a)  # scale 0 skips the net entirely


def test_pixel_space_base_gets_a_non_downsampling_hint_encoder():
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel(in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12,
                                attention_head_dim=2, norm_num_groups=4, sample_size=16)
    net = ControlNet.from_unet(unet, conditioning_embedding_out_channels=HINT_CHANNELS)
    assert net.config.hint_downsample_factor == 1
    x = torch.randn(1, 3, 16, 16)
    down, _ = net(x, 10, torch.randn(1, 4, 12), torch.rand(1, 3, 16, 16))
    assert down[0].shape == (1, 8, 16, 16)
    with pytest.raises(ValueError, match="condition image must be 1x"):
        net(x, 10, torch.randn(1, 4, 12), torch.rand(1, 3, 32, 32))


def test_gradient_checkpointing_gives_the_same_gradients(unet):
    sample, t, text, cond, kw = make_inputs(unet)
    grads = []
    for checkpointing in (False, True):
        net = randomize(ControlNet.from_unet(unet, conditioning_embedding_out_channels=HINT_CHANNELS))
        if checkpointing:
            net.enable_gradient_checkpointing()
        down, mid = net(sample, t, text, cond, **kw)
        (sum(d.square().mean() for d in down) + mid.square().mean()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)

"""Shared fixtures: tiny real models built from configs, seeded. No mocks."""

import pytest
import torch

from ctrlnet.models import ControlNet
from ctrlnet.testbed.tiny import FAMILIES, tiny_unet

HINT_CHANNELS = (4, 8, 8, 8)  # small hint encoder, still 3 stride-2 convs (8x, as for an SD VAE)


def randomize(module, seed=0, std=0.1):
    """Give every parameter (the zero convs too) random values so outputs are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def make_inputs(unet, batch=2, seed=0, size=8):
    """(sample, timestep, encoder_hidden_states, condition, extra kwargs) for a tiny UNet."""
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    sample = torch.randn(batch, cfg.in_channels, size, size, generator=g)
    text = torch.randn(batch, 5, cfg.cross_attention_dim, generator=g)
    condition = torch.rand(batch, 3, size * 8, size * 8, generator=g)
    kwargs = {}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, generator=g),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * batch)}
    return sample, torch.tensor([500] * batch), text, condition, kwargs


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def unet(family):
    return tiny_unet(family, seed=0)


@pytest.fixture
def controlnet(unet):
    return ControlNet.from_unet(unet, conditioning_embedding_out_channels=HINT_CHANNELS)

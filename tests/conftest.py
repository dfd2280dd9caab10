"""Shared fixtures: tiny real models built from configs, seeded. No mocks."""

import pytest
import torch

from ctrlnet.models import ControlNet
from ctrlnet.testbed.tiny import FAMILIES, tiny_unet

HINT_CHANNELS = (4, 8, 8, 8)  # small hint encoder, still 3 stride-2 convs (8x, as for an SD VAE)


@pytest.fixture(autouse=True)
def no_real_detector_weights(tmp_path_factory, monkeypatch):
    """No test finds the machine's own detector weights ($CTRLNET_ANNOTATORS,
    ~/.cache/ctrlnet/annotators, the Hugging Face cache): the neural annotators are unavailable
    unless a test puts random weights in place, on every machine alike."""
    empty = tmp_path_factory.getbasetemp() / "no-detector-weights"
    empty.mkdir(exist_ok=True)
    monkeypatch.setenv("CTRLNET_ANNOTATORS", str(empty))
    monkeypatch.setenv("HF_HUB_CACHE", str(empty / "hub"))
    monkeypatch.setenv("HOME", str(empty / "home"))  # ~/.cache/ctrlnet/annotators


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


# ---------------------------------------------------------------- `ctrlnet serve` (tests/serve/)
# A real server process on loopback with the bundled nano models, shared by the serve tests. Here,
# not in tests/serve/conftest.py: a second module named conftest would shadow this one for the
# tests that import helpers from it.

@pytest.fixture(scope="session")
def shapes_sample():
    """A ShapesWorld target image and its exact maps (seed 1, index 3)."""
    from ctrlnet.testbed.shapes import render, sample_layout
    s = sample_layout(3, seed=1, size=128)
    return s, render(s, 128)


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """`python -m ctrlnet.cli serve` on a free loopback port; small limits so the tests can hit them."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from servekit import launch, stop
    client = launch(["--queue", "1", "--max-upload-mb", "1", "--max-pixels", "1000000", "--max-steps", "50",
                     "--max-images", "2"], tmp_path_factory.mktemp("serve") / "server.log",
                    tmp_path_factory.mktemp("no-detector-weights"))  # the machine's own weights are not found
    yield client
    stop(client)

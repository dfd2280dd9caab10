"""Learned line art (lineart_realistic / lineart_coarse / lineart_anime): published weight layouts load
strictly, the original apps' pre/post-processing, bad files, where weights are found, batches."""

import pickle

import cv2
import numpy as np
import pytest
import torch

from ctrlnet.annotators import get_annotator, lineart_nets, unavailable, weights
from ctrlnet.annotators.lineart_nets import (Generator, UnetGenerator, lineart_anime, lineart_anime_batch,
                                             lineart_coarse, lineart_realistic, lineart_realistic_batch, pad64)
from ctrlnet.annotators.weights import WeightsError, WeightsNotFound
from detector_fixtures import line_photo as photo, no_weight_places, one_torch_thread  # noqa: F401 (fixtures)

# From the reference classes (ControlNet v1.1 annotator/lineart Generator(3, 1, 3) and
# annotator/lineart_anime UnetGenerator(3, 1, 8, 64, affine-free InstanceNorm)) instantiated in a
# scratch script; they match the published files' sizes (sk_model.pth 17.2 MB, netG.pth 218 MB of fp32).
GENERATOR_KEYS, GENERATOR_PARAMS = 24, 4_290_945
UNET_KEYS, UNET_PARAMS = 32, 54_405_505


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("lineart_weights")
    lineart_nets.write_random_weights(d, seed=0)
    return d


@pytest.fixture(autouse=True)
def isolated(no_weight_places):
    """Nothing from the real home or hub cache is ever found."""


def test_published_layouts_load_strictly(folder):
    for file in ("sk_model.pth", "sk_model2.pth"):
        state = torch.load(folder / file, weights_only=True)
        assert len(state) == GENERATOR_KEYS and sum(v.numel() for v in state.values()) == GENERATOR_PARAMS
        assert "model0.1.weight" in state and "model4.1.bias" in state  # no prefix
    state = torch.load(folder / "netG.pth", weights_only=True)
    assert len(state) == UNET_KEYS and sum(v.numel() for v in state.values()) == UNET_PARAMS
    assert all(k.startswith("module.model.") for k in state)  # DataParallel's prefix, as published
    assert sum(p.numel() for p in Generator().parameters()) == GENERATOR_PARAMS
    assert sum(p.numel() for p in UnetGenerator().parameters()) == UNET_PARAMS
    image = photo()
    for fn, file in ((lineart_realistic, "sk_model.pth"), (lineart_coarse, "sk_model2.pth")):  # anime: below
        out = fn(image, model=str(folder / file))
        assert out.shape == image.shape and out.dtype == np.uint8 and (out == out[..., :1]).all()


def constant_generator(path, bias):
    """A Generator whose map is ``sigmoid(bias)`` everywhere (all weights zero)."""
    state = {k: torch.zeros_like(v) for k, v in Generator().state_dict().items()}
    state["model4.1.bias"] = torch.tensor([bias])
    torch.save(state, path)


def test_realistic_output_is_inverted_and_truncated(tmp_path):
    # sigmoid(5) = 0.99331 -> paper: uint8(253.29) = 253 -> inverted: 2 (no line: black)
    constant_generator(tmp_path / "white.pth", 5.0)
    assert (lineart_realistic(photo(), model=str(tmp_path / "white.pth")) == 2).all()
    # sigmoid(-5) = 0.00669 -> ink: uint8(1.707) = 1 -> 254 (a line: white)
    constant_generator(tmp_path / "ink.pth", -5.0)
    assert (lineart_realistic(photo(), model=str(tmp_path / "ink.pth")) == 254).all()


def test_realistic_steps_as_the_original(folder):
    """Pad (edge) to multiples of 64, RGB / 255, the net, 255 - uint8(clip(255 y)), crop: recomputed
    here step by step on a size that needs padding."""
    image = photo(50, 70)
    padded = pad64(image)
    assert padded.shape == (64, 128, 3) and (padded[50:, :70] == image[-1:, :]).all() \
        and (padded[:50, 70:] == image[:, -1:]).all()
    net = Generator()
    net.load_state_dict(torch.load(folder / "sk_model.pth", weights_only=True))
    with torch.no_grad():
        y = net(torch.from_numpy(padded).float().permute(2, 0, 1)[None].contiguous() / 255.0)[0, 0].numpy()
    expected = 255 - (y * 255.0).clip(0, 255).astype(np.uint8)[:50, :70]
    out = lineart_realistic(image, model=str(folder / "sk_model.pth"))
    assert np.array_equal(out[..., 0], expected)
    coarse = lineart_coarse(image, model=str(folder / "sk_model2.pth"))
    assert not np.array_equal(coarse, out)  # another file, another map


def test_anime_steps_as_the_original_and_batch(folder):
    """Pad (edge) to multiples of 64, resize (bicubic) to multiples of 256, RGB / 127.5 - 1, the net,
    127.5 y + 127.5 resized back (bicubic), clipped, truncated, inverted, cropped: recomputed here
    step by step (the anime net is the slow one: 5 forward passes at 256 x 256 in all)."""
    a, b = photo(40, 100, seed=1), photo(40, 100, seed=2)  # padded to 64 x 128, run at 256 x 256
    net = UnetGenerator()
    state = torch.load(folder / "netG.pth", weights_only=True)
    net.load_state_dict({k[len("module."):]: v for k, v in state.items()})
    net.eval()
    x = cv2.resize(pad64(a), (256, 256), interpolation=cv2.INTER_CUBIC)
    with torch.no_grad():
        y = net(torch.from_numpy(x).float().permute(2, 0, 1)[None].contiguous() / 127.5 - 1.0)[0, 0] * 127.5 + 127.5
    back = cv2.resize(y.numpy(), (128, 64), interpolation=cv2.INTER_CUBIC)
    expected = 255 - back.clip(0, 255).astype(np.uint8)[:40, :100]
    model = str(folder / "netG.pth")  # the published layout ("module." keys) loads strictly
    single = [lineart_anime(a, model=model), lineart_anime(b, model=model)]
    assert np.array_equal(single[0][..., 0], expected)
    assert all(np.array_equal(p, q) for p, q in zip(lineart_anime_batch([a, b], model=model), single))


def test_bad_files(folder, tmp_path):
    with pytest.raises(WeightsError, match="sk_model.pth is not the ControlNet 1.1 anime line-art network"):
        lineart_anime(photo(), model=str(folder / "sk_model.pth"))  # another detector's file
    with pytest.raises(WeightsError, match="netG.pth is not the ControlNet 1.1 realistic"):
        lineart_realistic(photo(), model=str(folder / "netG.pth"))
    cut = tmp_path / "sk_model.pth"
    cut.write_bytes((folder / "sk_model.pth").read_bytes()[:100_000])
    with pytest.raises(WeightsError, match="could not be read"):
        lineart_realistic(photo(), model=str(cut))
    evil = tmp_path / "evil" / "sk_model2.pth"
    evil.parent.mkdir()
    torch.save({"model0.1.weight": pickle.PickleError("not a tensor")}, evil)  # weights_only refuses it
    with pytest.raises(WeightsError, match="sk_model2.pth holds pickled objects other than tensors; refused"):
        lineart_coarse(photo(), model=str(evil))
    with pytest.raises(WeightsNotFound) as e:
        lineart_realistic(photo())
    message = str(e.value)
    assert "sk_model.pth" in message and "CTRLNET_ANNOTATORS" in message and str(tmp_path / "hub") in message \
        and "https://huggingface.co/lllyasviel/Annotators" in message
    assert "netG.pth" in unavailable("lineart_anime")


def test_found_via_env_and_hub_cache(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("CTRLNET_ANNOTATORS", str(folder))
    image = photo()
    assert unavailable("lineart_realistic") == unavailable("lineart_anime") == ""
    via_env = lineart_realistic(image)
    assert np.array_equal(via_env, lineart_realistic(image, model=str(folder / "sk_model.pth")))
    monkeypatch.delenv("CTRLNET_ANNOTATORS")
    repo = tmp_path / "hub" / "models--lllyasviel--Annotators"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123" / "sk_model.pth").symlink_to(folder / "sk_model.pth")
    assert weights.find("lineart_realistic", lineart_nets.WEIGHTS["lineart_realistic"][0]) == \
        repo / "snapshots" / "abc123" / "sk_model.pth"
    assert np.array_equal(lineart_realistic(image), via_env)
    assert "sk_model2.pth" in unavailable("lineart_coarse")  # only sk_model.pth is there


def test_batch_equals_single_and_end_to_end(folder):
    images = [photo(seed=s) for s in range(2)]
    model = str(folder / "sk_model.pth")
    single = [lineart_realistic(i, model=model) for i in images]
    annotate = get_annotator("lineart_realistic", model=model)
    assert all(np.array_equal(a, b) for a, b in zip(annotate(images), single))  # BATCH: one forward pass
    assert len(lineart_realistic_batch([], model=model)) == 0
    small = get_annotator("lineart_coarse", model=str(folder / "sk_model2.pth"), detect_resolution=64)(photo(128, 192))
    assert small.shape == (128, 192, 3)
    with pytest.raises(ValueError, match="one size"):
        lineart_realistic_batch([photo(64, 64), photo(64, 96)], model=model)

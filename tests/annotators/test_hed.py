"""HED soft edges (``softedge_hed``, ``softedge_hedsafe``, ``scribble_hed``): the published weight
layout, the pre/post-processing on inputs with known answers, bad files, where weights are found,
batch == single."""

import pathlib

import cv2
import numpy as np
import pytest
import torch

from ctrlnet.annotators import get_annotator, hed, pidinet, weights
from ctrlnet.annotators.weights import WeightsError, WeightsNotFound
from detector_fixtures import blob_photo as photo, isolated, one_torch_thread  # noqa: F401 (fixtures)

NAMES = ("softedge_hed", "softedge_hedsafe", "scribble_hed")
# From the reference class (ControlNet-v1-1-nightly annotator/hed/__init__.py, ControlNetHED_Apache2(),
# instantiated in a scratch script): 37 tensors, 14,716,168 parameters; the published file is fp16
# (29.4 MB = 2 bytes a parameter).
KEYS, PARAMETERS = 37, 14_716_168


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("hed")
    hed.write_random_weights(d, seed=0)
    return d


def test_published_layout_loads_strictly(folder):
    state = torch.load(folder / "ControlNetHED.pth", weights_only=True)
    assert len(state) == KEYS and sum(v.numel() for v in state.values()) == PARAMETERS
    assert {"norm", "block1.convs.0.weight", "block1.projection.weight", "block5.convs.2.bias"} <= set(state)
    assert state["norm"].shape == (1, 3, 1, 1) and all(v.dtype == torch.float16 for v in state.values())
    net = hed.load("softedge_hed", str(folder / "ControlNetHED.pth"))
    assert next(net.parameters()).dtype == torch.float32
    assert torch.equal(net.block3.convs[1].weight.half().cpu(), state["block3.convs.1.weight"])


def crafted(path: pathlib.Path, biases=(0, 0, 0, 0, 0), red_gain=0.0):
    """A HED state dict whose output is known: every weight zero but the projections' biases; with
    ``red_gain`` block 1 passes the red channel through (centre taps) to its side output."""
    state = {k: torch.zeros_like(v) for k, v in hed.ControlNetHED_Apache2().state_dict().items()}
    for k, b in enumerate(biases, start=1):
        state[f"block{k}.projection.bias"][0] = b
    state["block1.convs.0.weight"][0, 0, 1, 1] = 1.0  # red (channel 0 of RGB) -> feature 0
    state["block1.convs.1.weight"][0, 0, 1, 1] = 1.0
    state["block1.projection.weight"][0, 0] = red_gain
    torch.save(state, path)
    weights.clear_cache()
    return str(path)


def test_fusion_sigmoid_and_safe_on_known_answers(tmp_path):
    # constant sides 1..5: mean 3 -> sigmoid(3) = 0.9526 -> 242; safe: int(0.9526 * 3) / 2 = 1 -> 255
    model = crafted(tmp_path / "a.pth", biases=(1, 2, 3, 4, 5))
    img = photo(50, 70)  # not a multiple of 64: padded, then cropped back
    soft = hed.softedge_hed(img, model=model)
    assert soft.shape == (50, 70, 3) and soft.dtype == np.uint8 and (soft == 242).all()
    assert (hed.softedge_hedsafe(img, model=model) == 255).all()
    # red passes through side 1 only (gain 5 / 255: mean over the 5 sides = R / 255): RGB order, raw 0..255
    model = crafted(tmp_path / "b.pth", red_gain=5 / 255)
    img = np.zeros((64, 96, 3), np.uint8)
    img[:, :48] = (255, 0, 0)
    img[:, 48:] = (0, 0, 255)
    soft = hed.softedge_hed(img, model=model)[..., 0]
    assert (soft[:, :47] == int(255 / (1 + np.exp(-1.0)))).all() and (soft[:, 49:] == 127).all()
    assert (hed.softedge_hedsafe(img, model=model)[..., 0][:, 49:] == 127).all()  # int(1.5) / 2 = 0.5


def test_fuse_and_pad():
    sides = [np.full((64 >> k, 32 >> k), float(k), np.float32) for k in range(5)]
    assert np.allclose(hed.fuse(sides, 64, 32), 1 / (1 + np.exp(-2.0)))
    a = np.arange(2 * 3 * 5 * 3).reshape(2, 3, 5, 3).astype(np.uint8)
    p = hed.pad_to(a, 4)
    assert p.shape == (2, 4, 8, 3) and np.array_equal(p[:, :3, :5], a)
    assert np.array_equal(p[:, 3, :5], a[:, 2]) and np.array_equal(p[:, :3, 7], a[:, :, 4])


def test_nms_and_scribble_recipe():
    # a soft vertical ridge at x = 20 and a faint one at x = 45: after the sigma-3 blur only the strong
    # one is over 127, and as it is constant along y the vertical line keeps all of it (the original's
    # nms keeps a pixel that is the maximum of its line in ANY of the 4 directions)
    x = np.arange(64, dtype=np.float32)
    soft = np.repeat((250 * np.exp(-((x - 20) / 3) ** 2) + 100 * np.exp(-((x - 45) / 3) ** 2))[None], 64, axis=0)
    soft = soft.astype(np.uint8)
    thin = hed.nms(soft, 127, 3.0)
    blurred = cv2.GaussianBlur(soft.astype(np.float32), (0, 0), 3.0)
    assert np.array_equal(thin, np.where(blurred > 127, 255, 0)) and np.array_equal(np.flatnonzero(thin[32]), [19, 20, 21])
    # a plane ramp x + 2 y is the maximum of no line inside: nothing kept away from the border
    ramp = (np.arange(64)[None, :] + 2 * np.arange(64)[:, None]).astype(np.uint8) + 60
    assert not hed.nms(ramp, 0, 1.0)[4:-4, 4:-4].any()
    # the scribble recipe thickens the kept line (blur 3, > 4) and drops the faint ridge
    strokes = hed.scribble_from(soft)
    row = np.flatnonzero(strokes[32])
    assert set(np.unique(strokes)) == {0, 255} and row.min() < 16 and 24 < row.max() < 30
    assert (strokes == strokes[32]).all() and not strokes[:, 35:].any()


def test_other_networks_file_is_an_error_naming_it(tmp_path):
    pidinet.write_random_weights(tmp_path)
    with pytest.raises(WeightsError, match=r"table5_pidinet\.pth is not the HED soft-edge network.*missing"):
        hed.softedge_hed(photo(), model=str(tmp_path / "table5_pidinet.pth"))


def test_truncated_and_unsafe_files(tmp_path, folder):
    cut = tmp_path / "ControlNetHED.pth"
    cut.write_bytes((folder / "ControlNetHED.pth").read_bytes()[:100_000])
    with pytest.raises(WeightsError, match=r"ControlNetHED\.pth could not be read .*truncated"):
        hed.softedge_hed(photo(), model=str(cut))
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"norm": pathlib.PurePosixPath("x")}, unsafe)  # a pickled non-tensor object
    with pytest.raises(WeightsError, match=r"unsafe\.pth holds pickled objects other than tensors"):
        hed.softedge_hed(photo(), model=str(unsafe))


def test_missing_names_the_places_searched(isolated):
    with pytest.raises(WeightsNotFound) as e:
        get_annotator("scribble_hed")(photo())
    message = str(e.value)
    assert "ControlNetHED.pth" in message and "huggingface.co/lllyasviel/Annotators" in message
    assert str(isolated / "ann") in message and str(isolated / "hub" / "models--lllyasviel--Annotators") in message
    with pytest.raises(WeightsNotFound, match="does not exist"):
        hed.softedge_hed(photo(), model=str(isolated / "nowhere.pth"))


def test_found_via_env_and_hub_cache(isolated, folder):
    data = (folder / "ControlNetHED.pth").read_bytes()
    img = photo()
    direct = hed.softedge_hed(img, model=str(folder / "ControlNetHED.pth"))
    snapshot = isolated / "hub" / "models--lllyasviel--Annotators" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "ControlNetHED.pth").write_bytes(data)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    assert weights.find("softedge_hed", hed.HED) == snapshot / "ControlNetHED.pth"
    assert np.array_equal(get_annotator("softedge_hed")(img), direct)
    (isolated / "ann" / "hed").mkdir()  # the A1111 layout: DIR/<module>/FILE, before the hub cache
    (isolated / "ann" / "hed" / "ControlNetHED.pth").write_bytes(data)
    assert weights.find("softedge_hed", hed.HED) == isolated / "ann" / "hed" / "ControlNetHED.pth"
    assert np.array_equal(get_annotator("softedge_hed")(img), direct)


def test_batch_equals_single_and_end_to_end(folder):
    model = str(folder / "ControlNetHED.pth")
    images = [photo(64, 64, seed=s) for s in range(2)]
    for name in NAMES:
        single = [hed.ANNOTATORS[name](i, model=model) for i in images]
        assert all(np.array_equal(a, b) for a, b in zip(single, hed.BATCH[name](images, model=model)))
        assert single[0].shape == (64, 64, 3) and single[0].dtype == np.uint8
    bound = get_annotator("scribble_hed", model=model)
    assert np.array_equal(bound(images[0]), single[0])
    assert all(np.array_equal(a, b) for a, b in zip(bound(images), single))  # through detect_many

"""Straight lines: M-LSD (published layout, pred_lines decoding on hand-made maps, padding, bad files,
where weights are found, batches) and OpenCV's LSD (drawn lines are found)."""

import cv2
import numpy as np
import pytest
import torch

from ctrlnet.annotators import WEIGHTS, available, get_annotator, mlsd as mlsd_module, unavailable, weights
from ctrlnet.annotators.lineart_nets import Generator, pad64
from ctrlnet.annotators.mlsd import MobileV2_MLSD_Large, decode_lines, draw_lines, lines_lsd, mlsd, mlsd_batch
from ctrlnet.annotators.weights import WeightsError, WeightsNotFound
from detector_fixtures import line_photo as photo, no_weight_places, one_torch_thread  # noqa: F401 (fixtures)

# From the reference class (ControlNet v1.1 annotator/mlsd MobileV2_MLSD_Large) instantiated in a
# scratch script: 362 state-dict entries (57 of them BatchNorm's num_batches_tracked), 1,552,681
# numbers in all, 1,533,680 of them parameters (the published file is 6.3 MB of fp32).
KEYS, NUMBERS, PARAMS = 362, 1_552_681, 1_533_680
FILE = "mlsd_large_512_fp32.pth"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlsd_weights")
    mlsd_module.write_random_weights(d, seed=0)
    return d


@pytest.fixture(scope="module")
def lively(tmp_path_factory, folder):
    """The random network with its head scaled so that it finds segments (random init gives
    displacements of a few hundredths of a pixel): centre logits spread, displacements ~10 px."""
    state = torch.load(folder / FILE, weights_only=True)
    state["block23.conv3.weight"][8:12] *= 500
    net = MobileV2_MLSD_Large()
    net.load_state_dict(state)
    x = torch.from_numpy(photo()).float().permute(2, 0, 1)[None] / 127.5 - 1.0
    with torch.no_grad():
        centre = net.eval()(torch.cat([x, torch.full_like(x[:, :1], -0.992)], 1))[0, 0]
    k = 1.5 / centre.std().item()  # centre logits ~ N(-1, 1.5) on these photos
    state["block23.conv3.weight"][7] *= k
    state["block23.conv3.bias"][7] = (state["block23.conv3.bias"][7] - centre.mean()) * k - 1.0
    path = tmp_path_factory.mktemp("mlsd_lively") / FILE
    torch.save(state, path)
    return path


@pytest.fixture(autouse=True)
def isolated(no_weight_places):
    """Nothing from the real home or hub cache is ever found."""


def test_published_layout_loads_strictly(folder):
    state = torch.load(folder / FILE, weights_only=True)
    assert len(state) == KEYS and sum(v.numel() for v in state.values()) == NUMBERS
    assert "backbone.features.0.0.weight" in state and "block23.conv3.bias" in state
    assert sum(p.numel() for p in MobileV2_MLSD_Large().parameters()) == PARAMS
    out = mlsd(photo(), model=str(folder / FILE))
    assert out.shape == (64, 96, 3) and out.dtype == np.uint8


def test_file_without_batchnorm_counters_loads(folder, tmp_path, lively):
    state = torch.load(lively, weights_only=True)
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, tmp_path / FILE)
    assert np.array_equal(mlsd(photo(), model=str(tmp_path / FILE)), mlsd(photo(), model=str(lively)))


def hand_made_map():
    """(5, 16, 24): centre logits -10 but for five peaks, displacements (x0, y0, x1, y1) at each."""
    tp = torch.zeros(5, 16, 24)
    tp[0] = -10.0
    peaks = {  # (y, x): (logit, displacement)
        (4, 5): (6.0, (-3, -1, 3, 1)),      # A: score 0.9975, length 6.3
        (4, 6): (5.0, (0, 0, 10, 0)),       # next to A, lower: suppressed (3x3 non-maximum suppression)
        (10, 15): (2.0, (0, -5, 0, 5)),     # B: 0.881, length 10
        (12, 3): (4.0, (-0.5, 0, 0.5, 0)),  # C: 0.982, length 1
        (2, 20): (1.0, (-2, 0, 2, 0)),      # D: 0.731, length 4
    }
    for (y, x), (logit, d) in peaks.items():
        tp[0, y, x] = logit
        tp[1:5, y, x] = torch.tensor(d, dtype=torch.float32)
    return tp


A, B, C, D = (4, 6, 16, 10), (30, 10, 30, 30), (5, 24, 7, 24), (36, 4, 44, 4)  # x0, y0, x1, y1 in image pixels


def segments(tp, **kw):
    return sorted(tuple(s) for s in decode_lines(tp, **kw).tolist())


def test_decoding_a_hand_made_prediction():
    tp = hand_made_map()
    assert segments(tp) == sorted([A, B, C, D])  # thr_v = thr_d = 0.1
    assert segments(tp, thr_v=0.9) == sorted([A, C])
    assert segments(tp, thr_d=2.0) == sorted([A, B, D])  # lengths on the half-size map
    assert segments(tp, thr_v=0.95, thr_d=5.0) == [A]
    assert segments(tp, topk=2) == sorted([A, C])  # the best two centres only
    assert segments(tp, thr_v=2.0) == []


def test_drawing_truncates_to_one_pixel_lines():
    out = draw_lines(np.array([[4.9, 6.2, 16.7, 6.9], [np.nan, 0, 1, 1], [1e30, 0, 0, 0]]), 12, 20)
    expected = np.zeros((12, 20), bool)
    expected[6, 4:17] = True
    assert np.array_equal(out[..., 0] > 0, expected) and set(np.unique(out)) == {0, 255}
    assert (out == out[..., :1]).all()


def test_network_input_padding_and_drawing_as_the_original(lively):
    """Edge-padded to multiples of 64, RGB + a channel of ones, all / 127.5 - 1 (float32, as
    pred_lines builds it), decoded, drawn on the padded canvas, cropped."""
    image = photo(50, 70)
    padded = pad64(image)
    assert padded.shape == (64, 128, 3)
    x = np.concatenate([padded, np.ones((64, 128, 1))], -1).transpose(2, 0, 1)[None].astype("float32") / 127.5 - 1.0
    net = MobileV2_MLSD_Large()
    net.load_state_dict(torch.load(lively, weights_only=True))
    with torch.no_grad():
        tp = net.eval()(torch.from_numpy(np.ascontiguousarray(x)))[0]  # NCHW: the same conv kernels as mlsd()
    assert tp.shape == (9, 32, 64)
    for thr_v, thr_d in ((0.1, 0.1), (0.6, 19.5)):  # all the peaks; a few
        lines = decode_lines(tp, thr_v, thr_d)
        expected = draw_lines(lines, 64, 128)[:50, :70]
        out = mlsd(image, model=str(lively), thr_v=thr_v, thr_d=thr_d)
        assert np.array_equal(out, expected) and 0 < len(lines) <= 200
    assert (out > 0).any() and set(np.unique(out)) == {0, 255}


def test_bad_files(tmp_path):
    other = tmp_path / "other" / FILE
    other.parent.mkdir()
    torch.save(Generator().state_dict(), other)  # the line-art network's weights under M-LSD's name
    with pytest.raises(WeightsError, match=f"{FILE} is not the M-LSD large line-segment network"):
        mlsd(photo(), model=str(other))
    state = MobileV2_MLSD_Large().state_dict()
    cut = tmp_path / "cut.pth"
    torch.save(state, cut)
    cut.write_bytes(cut.read_bytes()[:50_000])
    with pytest.raises(WeightsError, match="cut.pth could not be read"):
        mlsd(photo(), model=str(cut))
    evil = tmp_path / "evil.pth"
    torch.save({"block23.conv3.bias": ValueError("not a tensor")}, evil)
    with pytest.raises(WeightsError, match="evil.pth holds pickled objects other than tensors"):
        mlsd(photo(), model=str(evil))
    with pytest.raises(WeightsNotFound) as e:
        mlsd(photo())
    assert FILE in str(e.value) and str(tmp_path / "hub") in str(e.value) and "lllyasviel/Annotators" in str(e.value)
    with pytest.raises(ValueError, match="thr_v"):
        get_annotator("mlsd", thr_v=2.5)
    with pytest.raises(ValueError, match="thr_d"):
        get_annotator("mlsd", thr_d=0)


def test_found_via_env_and_hub_cache(lively, tmp_path, monkeypatch):
    assert not available("mlsd")
    monkeypatch.setenv("CTRLNET_ANNOTATORS", str(lively.parent))
    assert unavailable("mlsd") == ""
    expected = mlsd(photo(), model=str(lively))
    assert np.array_equal(mlsd(photo()), expected)
    monkeypatch.delenv("CTRLNET_ANNOTATORS")
    repo = tmp_path / "hub" / "models--lllyasviel--Annotators"
    (repo / "snapshots" / "f00d").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("f00d")
    (repo / "snapshots" / "f00d" / FILE).symlink_to(lively)
    assert weights.find("mlsd", WEIGHTS["mlsd"][0]) == repo / "snapshots" / "f00d" / FILE
    assert np.array_equal(mlsd(photo()), expected)


def test_batch_equals_single_and_end_to_end(lively):
    images = [photo(seed=s) for s in range(3)]
    single = [mlsd(i, model=str(lively), thr_v=0.5) for i in images]
    assert all((s > 0).any() for s in single)
    assert all(np.array_equal(a, b) for a, b in zip(mlsd_batch(images, model=str(lively), thr_v=0.5), single))
    annotate = get_annotator("mlsd", model=str(lively), thr_v=0.5)
    assert all(np.array_equal(a, b) for a, b in zip(annotate(images), single))
    assert np.array_equal(annotate(images[0]), single[0])


def test_lsd_finds_drawn_lines():
    page = np.full((128, 160, 3), 255, np.uint8)
    drawn = [((10, 20), (150, 20)), ((20, 40), (20, 120)), ((40, 110), (150, 50))]  # horizontal, vertical, diagonal
    for p, q in drawn:
        cv2.line(page, p, q, (0, 0, 0), 2)
    out = lines_lsd(page)
    assert out.shape == page.shape and set(np.unique(out)) == {0, 255} and (out == out[..., :1]).all()
    white = out[..., 0] > 0
    for p, q in drawn:
        mask = np.zeros(white.shape, np.uint8)
        cv2.line(mask, p, q, 1, 1)
        near = cv2.dilate(white.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
        assert near[mask > 0].mean() > 0.9  # the line is found along (almost) all its length
    strokes = cv2.dilate(255 - page[..., 0], np.ones((5, 5), np.uint8)) > 0
    assert strokes[white].mean() > 0.95  # and nothing else
    assert not lines_lsd(page, min_length=200).any()  # every segment is shorter
    assert "lines_lsd" not in WEIGHTS and available("lines_lsd")
    assert np.array_equal(get_annotator("lines_lsd", min_length=20)(page), out)
    assert not lines_lsd(np.full((64, 64, 3), 128, np.uint8)).any()  # a flat image has no lines

"""Every neural annotator, on random weights in its published layout (each module's
``write_random_weights``; full-size networks for the original files, tiny transformers folders),
takes what users give it: 1-pixel strips, a single pixel, odd sizes, greyscale, a list of
images of mixed sizes - a map of the input's size each time, the list equal to one at a time."""

import numpy as np
import pytest

from ctrlnet.annotators import WEIGHTS, get_annotator, unavailable
from ctrlnet.annotators import ade20k, depth, dwpose, hed, lineart_nets, mlsd, normalbae, pidinet
from ctrlnet.annotators import weights as W
from detector_fixtures import one_torch_thread  # noqa: F401 (fixtures)

MODULES = (hed, pidinet, lineart_nets, mlsd, depth, normalbae, ade20k, dwpose)
NAMES = sorted(WEIGHTS)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    pytest.importorskip("onnx")  # DWPose's stand-in models are written with it (test extra)
    root = tmp_path_factory.mktemp("detector-weights")
    for m in MODULES:
        m.write_random_weights(root, seed=0)
    return root


@pytest.fixture
def found(folder, monkeypatch):
    monkeypatch.setenv("CTRLNET_ANNOTATORS", str(folder))
    yield folder
    W.clear_cache()


def photo(h, w, grey=False):
    rng = np.random.default_rng(h * 1000 + w)
    a = rng.integers(0, 256, (h, w) if grey else (h, w, 3)).astype(np.uint8)
    return a


def test_every_module_makes_all_its_annotators_available(found):
    assert {n: unavailable(n) for n in NAMES} == {n: "" for n in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_odd_shapes_and_mixed_batches(found, name):
    annotate = get_annotator(name)
    for h, w, grey in ((1, 256, False), (256, 1, False), (1, 1, False), (3, 200, False), (37, 53, True)):
        out = annotate(photo(h, w, grey))
        assert out.shape == (h, w, 3) and out.dtype == np.uint8, (name, h, w)
    assert np.array_equal(annotate(photo(37, 53)), annotate(photo(37, 53)))  # deterministic
    images = [photo(37, 53), photo(64, 64), photo(37, 53)]
    together = annotate(images)
    assert [o.shape for o in together] == [(37, 53, 3), (64, 64, 3), (37, 53, 3)]
    for image, out in zip(images, together):
        single = annotate(image)
        # one forward pass of several images may round differently in the last bit (CPU kernels
        # block by batch size): at most one level off, on almost every pixel equal
        diff = np.abs(out.astype(int) - single.astype(int))
        assert diff.max() <= 1 or (diff > 0).mean() < 0.01, name

import numpy as np
import pytest
from PIL import Image

from ctrlnet.annotators import ANNOTATORS, get_annotator
from ctrlnet.testbed.shapes import generate


def test_canny_matches_shapesworld_maps(tmp_path):
    data = generate(tmp_path / "d", 3, seed=0, size=64, workers=1, progress=False)
    annotate = get_annotator("canny", low=100, high=200)
    for i in range(3):
        target = np.asarray(Image.open(data / "target" / f"{i}.png").convert("RGB"))
        expected = np.asarray(Image.open(data / "canny" / f"{i}.png").convert("RGB"))
        out = annotate(target)
        assert out.shape == target.shape and out.dtype == np.uint8 and np.array_equal(out, expected)
    assert not get_annotator("canny", low=1000, high=2000)(target).any()  # thresholds matter


def test_annotator_errors():
    assert "canny" in ANNOTATORS
    with pytest.raises(ValueError, match="unknown annotator 'depth_magic'"):
        get_annotator("depth_magic")
    with pytest.raises(ValueError, match="unknown parameter.*'sigma'"):
        get_annotator("canny", sigma=2)
    with pytest.raises(ValueError, match="low <= high"):
        get_annotator("canny", low=200, high=100)(np.zeros((8, 8, 3), np.uint8))

"""Every annotator parameter is range-checked when the annotator is bound (get_annotator, and so the
CLI, the Python API, training and the server alike): bad values are a ValueError naming the
annotator, the parameter, the value and the valid range; defaults and both ends of each range work.
Degenerate image shapes neither crash nor blow up memory."""

import inspect
import math

import numpy as np
import pytest

from ctrlnet.annotators import (ANNOTATORS, MAX_PIXELS, PARAMS, RESOLUTION, WEIGHTS, available, check_params,
                                get_annotator, resolved_params)

CASES = [(name, key) for name in sorted(PARAMS) for key in sorted(PARAMS[name])]


def bad_values(spec) -> list:
    if spec.kind is bool:
        return [1, 0, "true", None, 0.5]
    if spec.kind is str:
        return ["pencil", 3, None, True] if spec.choices else [3, None, True, ["a.pth"]]  # no choices: a path
    below = spec.low - (1 if spec.kind is int else max(spec.low, 0.01))  # low 0.1 -> 0, low 0 -> -0.01
    wrong = [below, spec.high + 1, spec.high * 10, -1e9, 10 ** 400, math.nan, math.inf, -math.inf, "abc", "1", True,
             False, None, [1]]
    if spec.kind is int:
        wrong.append(spec.low + 0.5)  # not an integer
    return [v for v in wrong if not (isinstance(v, (int, float)) and not isinstance(v, bool)
                                     and spec.kind is float and spec.low <= v <= spec.high)]


def test_every_parameter_has_a_declared_range_holding_its_default():
    assert set(PARAMS) == set(ANNOTATORS)
    for name, fn in ANNOTATORS.items():
        signature = {p.name: p.default for p in inspect.signature(fn).parameters.values() if p.name != "image"}
        assert set(signature) == set(PARAMS[name]), name
        for key, default in signature.items():
            assert PARAMS[name][key].check(default) is not None, (name, key, default)


@pytest.mark.parametrize("name,key", CASES)
def test_bad_values_are_refused_at_bind_time(name, key):
    spec = PARAMS[name][key]
    for value in bad_values(spec):
        with pytest.raises(ValueError) as e:
            get_annotator(name, **{key: value})
        message = str(e.value)
        assert f"annotator {name!r}" in message and f"{key}={value!r}" in message, message
        assert spec.describe() in message, message  # the valid range


def image(h=24, w=40):
    rng = np.random.default_rng(0)
    a = np.full((h, w, 3), 230, np.uint8)
    a[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = rng.integers(0, 120, 3)
    return a


@pytest.mark.parametrize("name,key", CASES)
def test_defaults_and_range_ends_work(name, key):
    spec = PARAMS[name][key]
    if spec.kind is bool:
        values = [True, False]
    elif spec.kind is str:
        values = list(spec.choices)
    else:
        values = [spec.low, spec.high] + ([float(spec.high)] if spec.kind is int else [])  # 4.0 for an int is 4
    others = {("canny", "low"): {"high": 2040}, ("canny", "high"): {"low": 0}}.get((name, key), {})  # low <= high
    for value in values:
        annotate = get_annotator(name, **{key: value}, **others)
        assert check_params(name, {key: value, **others})[key] == value
        if available(name):
            out = annotate(image())
            assert out.shape == (24, 40, 3) and out.dtype == np.uint8


def test_ordered_pairs_and_types_are_normalised():
    with pytest.raises(ValueError, match=r"annotator 'canny': need low <= high, got low=300, high=200"):
        get_annotator("canny", low=300)
    low = check_params("canny", {"low": 50.0})["low"]  # JSON / YAML may spell an integer 50.0
    assert low == 50 and type(low) is int
    assert type(check_params("softedge", {"sigma": 2})["sigma"]) is float
    assert check_params("canny", {"low": np.int64(7), "high": np.float32(9)}) == {"low": 7, "high": 9}
    with pytest.raises(ValueError, match=r"low=np.True_ is not an integer in \[0, 2040\]"):
        check_params("canny", {"low": np.bool_(True)})
    assert resolved_params("canny", {"low": 50}) == {"low": 50, "high": 200}


@pytest.mark.parametrize("key", ["detect_resolution", "image_resolution"])
def test_resolutions(key):
    for value in (0, -64, 63, RESOLUTION.high + 1, 512.5, "512", True, math.nan, math.inf):
        with pytest.raises(ValueError, match=rf"annotator 'canny': {key}=.* is not an integer in \[64, 2048\]"):
            get_annotator("canny", **{key: value})
    assert get_annotator("canny", **{key: None})(image()).shape == (24, 40, 3)  # None: not used
    for value in (64, RESOLUTION.high):
        out = get_annotator("canny", **{key: value})(image())
        short = 24 if key == "detect_resolution" else value  # image_resolution sets the output's short side
        assert min(out.shape[:2]) == short


@pytest.mark.parametrize("name", sorted(set(ANNOTATORS) - set(WEIGHTS)))  # neural: test_detector_shapes.py
def test_degenerate_shapes(name):
    """1 x 256 and 256 x 1 strips and a single pixel: a map of the same shape, no crash."""
    if not available(name):
        pytest.skip(f"{name} needs an optional extra")
    annotate = get_annotator(name)
    for h, w in ((1, 256), (256, 1), (1, 1), (2, 3)):
        out = annotate(image(h, w))
        assert out.shape == (h, w, 3) and out.dtype == np.uint8, (h, w)


def test_extreme_aspects_are_refused_before_scaling():
    """detect_resolution 512 on a 64 x 65536 strip would make a 512 x 524288 (268 MP) image."""
    strip = np.zeros((65536, 64, 3), np.uint8)  # (H, W, 3): 64 wide, 65536 tall
    with pytest.raises(ValueError, match=r"annotator 'canny': detect_resolution=512 would scale the 64x65536 image "
                                         r"to 512x524288 \(268 MP\), over the limit of 16.8 MP"):
        get_annotator("canny", detect_resolution=512)(strip)
    with pytest.raises(ValueError, match=r"image_resolution=512 would scale the 1x256 image to 512x131072"):
        get_annotator("canny", image_resolution=512)(np.zeros((256, 1, 3), np.uint8))
    # within the limit it runs: 64 x 4096 -> 64 x 4096 at detect_resolution 64
    assert get_annotator("canny", detect_resolution=64)(strip[:4096]).shape == (4096, 64, 3)
    assert MAX_PIXELS == 4096 * 4096

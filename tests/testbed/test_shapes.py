"""ShapesWorld: determinism, formats, and metadata that agrees with the pixels."""

import hashlib
import json

import cv2
import numpy as np
import pytest

from ctrlnet.testbed.shapes import CONDITIONS, PALETTE, SEG_PALETTE, generate


def read_rgb(path):
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != "shapes.json":
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("sw") / "a", 40, seed=3, size=64, workers=1, progress=False)


def test_deterministic_whatever_the_worker_count(tmp_path, shapes):
    again = generate(tmp_path / "b", 40, seed=3, size=64, workers=2, progress=False)
    assert digest(shapes) == digest(again)
    other = generate(tmp_path / "c", 40, seed=4, size=64, workers=1, progress=False)
    assert digest(other) != digest(shapes)


def test_formats(shapes):
    for name, source in (("prompt.json", "outline"), ("prompt_canny.json", "canny"),
                         ("prompt_segmentation.json", "segmentation")):
        lines = [json.loads(l) for l in (shapes / name).read_text().splitlines()]
        assert len(lines) == 40 and set(lines[0]) == {"source", "target", "prompt"}
        assert all(l["source"].startswith(source + "/") and (shapes / l["source"]).is_file() for l in lines)
    meta = [json.loads(l) for l in (shapes / "metadata.jsonl").read_text().splitlines()]
    assert {"file_name", "conditioning_image", "text"} <= set(meta[0])
    assert all((shapes / m["file_name"]).is_file() and (shapes / m["conditioning_image"]).is_file() for m in meta)
    assert len(PALETTE) >= 12
    counts = {len(m["shapes"]) for m in meta}
    assert counts == {1, 2, 3}
    assert {s["shape"] for m in meta for s in m["shapes"]} == {"circle", "square", "triangle"}


def test_metadata_agrees_with_pixels(shapes):
    meta = [json.loads(l) for l in (shapes / "metadata.jsonl").read_text().splitlines()]
    for m in meta:
        target = read_rgb(shapes / m["file_name"])
        seg = read_rgb(shapes / m["segmentation"])
        canny = read_rgb(shapes / m["canny"])
        for s in m["shapes"]:
            cx, cy = int(s["cx"]), int(s["cy"])
            assert tuple(target[cy, cx]) == tuple(s["rgb"]) == PALETTE[s["colour"]]
            assert tuple(seg[cy, cx]) == SEG_PALETTE[s["shape"]]
            assert s["colour"] in m["text"] and s["shape"] in m["text"]
            x0, y0, x1, y1 = s["bbox"]
            cls = np.all(seg == SEG_PALETTE[s["shape"]], axis=-1).astype(np.uint8)
            _, labels = cv2.connectedComponents(cls, connectivity=8)
            component = labels == labels[cy, cx]  # shapes never touch: this is the shape's own region
            assert component.sum() == s["area"]
            ys, xs = np.nonzero(component)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)
            # geometry: a circle fills ~pi/4 of its box, a square all of it, a triangle ~half
            fill = s["area"] / ((x1 - x0) * (y1 - y0))
            expected = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}[s["shape"]]
            assert abs(fill - expected) < 0.12, (s, fill)
        background = np.all(seg == 0, axis=-1)
        assert np.all(target[background] == m["background_rgb"])
        assert m["background"] in m["text"]
        # Canny edges lie on shape borders only
        assert canny[..., 0][background & (cv2.erode(background.astype(np.uint8), np.ones((5, 5))) > 0)].max() == 0
        for c in CONDITIONS:
            assert read_rgb(shapes / m[c]).shape == (64, 64, 3)


def test_fill50k_recipe(tmp_path):
    out = generate(tmp_path / "f", 10, seed=0, size=64, fill50k=True, workers=1, progress=False)
    lines = [json.loads(l) for l in (out / "prompt.json").read_text().splitlines()]
    meta = [json.loads(l) for l in (out / "metadata.jsonl").read_text().splitlines()]
    for line, m in zip(lines, meta):
        assert len(m["shapes"]) == 1 and m["shapes"][0]["shape"] == "circle"
        assert line["prompt"] == f"{m['shapes'][0]['colour']} circle with {m['background']} background"
        outline = read_rgb(out / line["source"])
        assert set(np.unique(outline)) <= {0, 255} and outline.max() == 255


def test_cli_and_bad_arguments(tmp_path):
    from ctrlnet.cli import main
    assert main(["data", "shapes", "--n", "3", "--out", str(tmp_path / "s"), "--size", "64", "--workers", "1"]) == 0
    assert len((tmp_path / "s" / "prompt.json").read_text().splitlines()) == 3
    with pytest.raises(SystemExit) as e:  # argparse's range check: one line, exit code 2
        main(["data", "shapes", "--n", "0", "--out", str(tmp_path / "z")])
    assert e.value.code == 2

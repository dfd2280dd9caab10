"""`ctrlnet annotate` over folders: parallel, resumable (redone when the annotator or its parameters
change), upright (EXIF), bad files reported, training-ready data sets."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ctrlnet.annotators import get_annotator
from ctrlnet.annotators.batch import RECORD_KEY, annotate
from ctrlnet.eval.control import edge_f1
from ctrlnet.images import png_text
from ctrlnet.training.data import ControlDataset, read_records


def photos(folder: Path, n: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        a = np.full((96, 128, 3), 240, np.uint8)
        y, x = rng.integers(10, 50, 2)
        a[y:y + 30, x:x + 40] = rng.integers(0, 200, 3)
        (folder / "sub").mkdir(exist_ok=True)
        Image.fromarray(a).save(folder / ("sub" if i == 0 else "") / f"p{i}.png")
        (folder / ("sub" if i == 0 else "") / f"p{i}.txt").write_text(f"a box number {i}\n")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return folder


def test_folder_to_fill50k_dataset_in_parallel_and_resumable(tmp_path):
    src = photos(tmp_path / "in")
    out = tmp_path / "out"
    report = annotate("canny", [src], out, workers=2, dataset="fill50k", progress=False)
    assert len(report.written) == 4 and [p.name for p, _ in report.failed] == ["broken.png"]
    assert "cannot decode" in report.failed[0][1]
    assert (out / "sub" / "p0.png").is_file()  # the folder structure is mirrored
    records = read_records(out / "prompt.json")
    assert sorted(r.text for r in records) == [f"a box number {i}" for i in range(4)]
    ds = ControlDataset(records, 64)
    for i in range(len(ds)):
        assert ds.image(i).shape == ds.condition(i).shape == (64, 64, 3)
    again = annotate("canny", [src], out, workers=2, progress=False)
    assert len(again.written) == 0 and len(again.skipped) == 4  # already done: skipped


def test_captions_file_and_imagefolder(tmp_path):
    src = photos(tmp_path / "in", 2)
    (src / "broken.png").unlink()
    (tmp_path / "c.csv").write_text("file_name,text\nsub/p0.png,first\np1.png,second\n")
    report = annotate("seg_colour_clusters", [src], tmp_path / "out", dataset="imagefolder", captions=tmp_path / "c.csv",
                      progress=False)
    rows = [json.loads(l) for l in (tmp_path / "out" / "metadata.jsonl").read_text().splitlines()]
    assert sorted(r["text"] for r in rows) == ["first", "second"] and not report.failed
    assert len(read_records(tmp_path / "out" / "metadata.jsonl")) == 2


def test_cli_annotate(tmp_path):
    src = photos(tmp_path / "in", 2)
    exe = Path(sys.executable).parent / "ctrlnet"
    r = subprocess.run([str(exe), "annotate", "--annotator", "canny", "--param", "low=50", "--param", "high=150",
                        str(src), "--out", str(tmp_path / "o"), "--workers", "2"], capture_output=True, text=True)
    assert r.returncode == 1 and "2 written" in r.stdout and "broken.png" in r.stderr, (r.stdout, r.stderr)
    r = subprocess.run([str(exe), "annotate", "--annotator", "canny", "--param", "sigma=2", str(src), "--out",
                        str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown parameter" in r.stderr and "Traceback" not in r.stderr


def test_exif_portrait_is_annotated_upright(tmp_path):
    """A phone portrait stored sideways (a JPEG with EXIF orientation 6) gives an upright map of the
    upright shape."""
    upright = np.full((160, 96, 3), 235, np.uint8)  # (H, W): portrait
    upright[20:70, 20:76] = (30, 60, 200)  # a box near the top
    stored = np.ascontiguousarray(np.rot90(upright, 1))  # as the sensor saw it; tag 6 = turn it 90 degrees clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "in").mkdir()
    Image.fromarray(stored).save(tmp_path / "in" / "phone.jpg", quality=95, exif=exif)
    report = annotate("canny", [tmp_path / "in"], tmp_path / "out", progress=False)
    assert not report.failed
    edges = np.asarray(Image.open(tmp_path / "out" / "phone.png").convert("RGB"))
    assert edges.shape == (160, 96, 3)
    assert edge_f1(edges, get_annotator("canny")(upright), tolerance=2) > 0.8  # the box's outline, upright
    assert edges[100:].max() == 0  # nothing below the box


def maps(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.png"))}


def test_reruns_redo_outputs_made_another_way(tmp_path):
    src = photos(tmp_path / "in", 3)
    (src / "broken.png").unlink()
    out = tmp_path / "out"
    first = annotate("canny", [src], out, params={"low": 100}, progress=False)
    assert len(first.written) == 3 and not first.replaced
    made = json.loads(png_text(out / "p1.png")[RECORD_KEY])
    assert made == {"annotator": "canny", "params": {"low": 100, "high": 200}}  # defaults recorded too
    # identical (the default spelt out or not): resumable, nothing redone
    same = annotate("canny", [src], out, progress=False)
    assert len(same.skipped) == 3 and not same.written
    # other parameters: all redone, and the maps change
    before = maps(out)
    low = annotate("canny", [src], out, params={"low": 10, "high": 20}, progress=False)
    assert len(low.written) == 3 and len(low.replaced) == 3 and not low.skipped
    assert json.loads(png_text(out / "p1.png")[RECORD_KEY])["params"] == {"low": 10, "high": 20}
    assert annotate("canny", [src], out, params={"low": 10, "high": 20}, progress=False).skipped
    # another annotator: redone
    other = annotate("threshold", [src], out, progress=False)
    assert len(other.written) == 3 and maps(out) != before
    # force: redone although done
    forced = annotate("threshold", [src], out, progress=False, force=True)
    assert len(forced.written) == 3 and len(forced.replaced) == 3
    # a map without a record (an older version's) is redone; a newer input too
    Image.open(out / "p1.png").save(out / "p1.png")  # the pixels kept, the record dropped
    redo = annotate("threshold", [src], out, progress=False)
    assert [p.name for p in redo.written] == ["p1.png"] and len(redo.skipped) == 2
    later = (out / "p2.png").stat().st_mtime + 10
    os.utime(src / "p2.png", (later, later))
    assert [p.name for p in annotate("threshold", [src], out, progress=False).written] == ["p2.png"]


def test_bad_parameters_fail_before_any_work(tmp_path):
    src = photos(tmp_path / "in", 1)
    with pytest.raises(ValueError, match=r"annotator 'softedge': sigma=0 is not a number in \[0.1, 8\]"):
        annotate("softedge", [src], tmp_path / "out", params={"sigma": 0}, progress=False)
    assert not (tmp_path / "out").exists()

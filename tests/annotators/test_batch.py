"""`ctrlnet annotate` over folders: parallel, resumable, bad files reported, training-ready data sets."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from ctrlnet.annotators.batch import annotate
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
    report = annotate("segmentation", [src], tmp_path / "out", dataset="imagefolder", captions=tmp_path / "c.csv",
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

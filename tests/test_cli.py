"""`ctrlnet convert` and `ctrlnet inspect` as a user runs them (subprocess, installed entry point)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from ctrlnet.formats import load_controlnet, save_controlnet
from conftest import randomize


def run(*args):
    """The installed console script of this environment (pyproject's entry point)."""
    exe = Path(sys.executable).parent / "ctrlnet"
    assert exe.is_file(), "the ctrlnet entry point is not installed in this environment"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300)


def test_convert_and_inspect(tmp_path, controlnet):
    randomize(controlnet)
    save_controlnet(controlnet, tmp_path / "diffusers")
    r = run("convert", str(tmp_path / "diffusers"), "--to", "original", "--out", str(tmp_path / "o.safetensors"),
            "--half")
    assert r.returncode == 0, r.stderr
    r = run("inspect", str(tmp_path / "o.safetensors"))
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["format"] == "original" and info["dtype"] == "float16"
    assert info["parameters"] == sum(p.numel() for p in controlnet.parameters())
    assert info["base"] == "custom"
    r = run("convert", str(tmp_path / "o.safetensors"), "--to", "diffusers", "--out", str(tmp_path / "back"))
    assert r.returncode == 0, r.stderr
    back = load_controlnet(tmp_path / "back")
    for k, v in controlnet.state_dict().items():
        assert torch.equal(back.state_dict()[k], v.half())


def test_inspect_resolves_bundled_names():
    from ctrlnet.formats import inspect_checkpoint
    info = inspect_checkpoint("nano-canny")
    assert info["format"] == "diffusers" and info["path"].endswith("nano-canny")
    assert info["parameters"] == sum(p.numel() for p in load_controlnet("nano-canny").parameters())


def test_bad_file_is_one_line_error_without_traceback(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    r = run("inspect", str(tmp_path / "junk.safetensors"))
    assert r.returncode == 2
    assert "junk.safetensors" in r.stderr and "Traceback" not in r.stderr


def test_generate_with_bundled_nano_models(tmp_path):
    """The defaults: nano base, a bundled ControlNet by name, a ready condition map and an annotator."""
    import numpy as np
    from PIL import Image
    from ctrlnet.testbed.shapes import render, sample_layout
    maps = render(sample_layout(0, seed=21, size=128), 128)
    Image.fromarray(maps["canny"]).save(tmp_path / "edges.png")
    Image.fromarray(maps["target"]).save(tmp_path / "photo.png")
    r = run("generate", "--prompt", "a red circle on a white background", "--steps", "4", "--num-images", "2",
            "--control", f"model=nano-canny,image={tmp_path / 'edges.png'},end=0.8",
            "--control", f"model=nano-canny,image={tmp_path / 'photo.png'},annotator=canny,scale=0.5",
            "--grid", "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["000.png", "001.png", "grid.png"]
    image = Image.open(tmp_path / "out" / "001.png")
    assert image.size == (128, 128)
    params = image.text["parameters"]
    assert "Seed: 1" in params and "ControlNet 1" in params and "Module: canny" in params
    assert np.asarray(Image.open(tmp_path / "out" / "grid.png")).shape == (256, 3 * 128, 3)
    r = run("generate", "--prompt", "a blue square", "--steps", "2", "--out", str(tmp_path / "one.png"))
    assert r.returncode == 0 and (tmp_path / "one.png").is_file(), r.stderr
    # PyTorch's plain kernels instead of packed weights: the same image up to float rounding
    r = run("generate", "--prompt", "a blue square", "--steps", "2", "--no-packed-weights",
            "--out", str(tmp_path / "plain.png"))
    assert r.returncode == 0, r.stderr
    a, b = (np.asarray(Image.open(tmp_path / f), dtype=int) for f in ("one.png", "plain.png"))
    assert np.abs(a - b).max() <= 2
    # torch.compile (inductor; the only test that runs its code generation: ~2 min on 2 cores). Its
    # CPU kernels are C++: on a machine without a compiler the command must say so in one line.
    r = run("generate", "--prompt", "a blue square", "--steps", "2", "--compile", "--out", str(tmp_path / "c.png"))
    if not (os.environ.get("CXX") or any(shutil.which(c) for c in ("c++", "g++", "clang++"))):
        assert r.returncode == 2 and "needs a C++ compiler" in r.stderr and "Traceback" not in r.stderr, r.stderr
        return
    assert r.returncode == 0, r.stderr
    c = np.asarray(Image.open(tmp_path / "c.png"), dtype=int)
    assert np.abs(a - c).max() <= 2


def test_generate_errors_are_one_line(tmp_path):
    cases = [
        (["--control", f"model=nano-canny,image={tmp_path / 'none.png'}"], "none.png: no such image file"),
        (["--control", "model=nano-canny,image=x.png,annotator=hed"], "unknown annotator 'hed'"),
        (["--control", "model=nano-canny,image=x.png,strength=2"], "unknown key 'strength'"),
        (["--control", "image=x.png"], "model=NAME_OR_PATH is required"),
        (["--scheduler", "heunn"], "unknown scheduler 'heunn'"),
        (["--control", f"model={tmp_path / 'nothing'},image=x.png"], "nothing"),
    ]
    Path(tmp_path / "x.png").write_bytes(b"")
    for extra, words in cases:
        r = run("generate", "--prompt", "a red circle", "--steps", "1", "--out", str(tmp_path / "o"), *extra)
        assert r.returncode == 2, (extra, r.stderr)
        assert words in r.stderr and "Traceback" not in r.stderr, (extra, r.stderr)
    r = run("generate", "--prompt", "a red circle " * 20, "--steps", "1", "--out", str(tmp_path / "long.png"))
    assert r.returncode == 0 and "warning: prompt has" in r.stderr, r.stderr


def test_inspect_takes_bundled_names_and_names_a_base_model():
    from ctrlnet.testbed import NANO_SD
    r = run("inspect", "nano-canny")  # a bundled name, as convert and --control take it
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["format"] == "diffusers"
    r = run("inspect", str(NANO_SD))  # the bundled base's diffusers folder: a base, not a ControlNet
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{NANO_SD}: a base model folder" in r.stderr and "not a ControlNet" in r.stderr, r.stderr
    assert r.stderr.count(str(NANO_SD)) == 1 and len(r.stderr.strip().splitlines()) == 1


def test_annotate_reruns_redo_on_new_parameters_and_force(tmp_path):
    """`ctrlnet annotate` twice with the same parameters skips; other parameters or --force redo."""
    from PIL import Image
    from ctrlnet.testbed.shapes import render, sample_layout
    Image.fromarray(render(sample_layout(0, seed=3, size=128), 128)["target"]).save(tmp_path / "a.png")
    out = tmp_path / "maps"
    first = run("annotate", "--annotator", "canny", str(tmp_path / "a.png"), "--out", str(out), "--workers", "1")
    assert first.returncode == 0 and "1 written" in first.stdout, first.stdout + first.stderr
    before = (out / "a.png").read_bytes()
    same = run("annotate", "--annotator", "canny", "--param", "low=100", str(tmp_path / "a.png"), "--out", str(out),
               "--workers", "1")  # the default spelled out: the same parameters
    assert "0 written" in same.stdout and "1 already done" in same.stdout, same.stdout
    other = run("annotate", "--annotator", "canny", "--param", "low=20", "--param", "high=60", str(tmp_path / "a.png"),
                "--out", str(out), "--workers", "1")
    assert "1 written (1 redone" in other.stdout, other.stdout
    assert (out / "a.png").read_bytes() != before  # lower thresholds: more edges
    forced = run("annotate", "--annotator", "canny", "--param", "low=20", "--param", "high=60", "--force",
                 str(tmp_path / "a.png"), "--out", str(out), "--workers", "1")
    assert "1 written (1 redone" in forced.stdout, forced.stdout

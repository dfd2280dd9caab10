"""`ctrlnet convert` and `ctrlnet inspect` as a user runs them (subprocess, installed entry point)."""

import json
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


def test_bad_file_is_one_line_error_without_traceback(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    r = run("inspect", str(tmp_path / "junk.safetensors"))
    assert r.returncode == 2
    assert "junk.safetensors" in r.stderr and "Traceback" not in r.stderr

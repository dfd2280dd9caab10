"""`ctrlnet generate` (and the other commands' arguments) called in this process through
``ctrlnet.cli.main``: range-checked numbers, --control quoting, --out formats, warnings, one-line
errors, EXIF orientation. The bundled nano models, 1-2 steps."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from ctrlnet import cli
from ctrlnet.cli import main, parse_control, split_control
from ctrlnet.formats import CheckpointError


@pytest.fixture(autouse=True)
def no_allocator_change(monkeypatch):
    """main() keeps freed memory for `generate` (process-wide, glibc): not in the test process."""
    monkeypatch.setattr(cli, "retain_freed_memory", lambda: None)


@pytest.fixture(scope="module")
def maps():
    from ctrlnet.testbed.shapes import render, sample_layout
    return render(sample_layout(0, seed=21, size=128), 128)


def error_line(capsys) -> str:
    """stderr, checked to be one line with no traceback."""
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------------- numbers

@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "argument --steps: 0 is not an integer in [1, 1000]"),
    (["--steps", "ten"], "argument --steps: 'ten' is not an integer"),
    (["--guidance", "nan"], "argument --guidance: nan is not a number in [0, 100]"),
    (["--guidance", "inf"], "argument --guidance: inf is not a number in [0, 100]"),
    (["--guidance-rescale", "1.5"], "argument --guidance-rescale: 1.5 is not a number in [0, 1]"),
    (["--num-images", "0"], "argument --num-images: 0 is not an integer in [1, 100]"),
    (["--width", "0"], "argument --width: 0 is not an integer in [1, 8192]"),
    (["--height", "-64"], "argument --height: -64 is not an integer in [1, 8192]"),
    (["--strength", "0"], "argument --strength: 0 is not a number in (0, 1]"),
    (["--seed", "-2"], "argument --seed: -2 is not an integer in [-1, 4294967295]"),
    (["--seed", "4294967296"], "argument --seed: 4294967296 is not an integer in [-1, 4294967295]"),
])
def test_generate_numbers_out_of_range_exit_2_with_one_line(capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--prompt", "x", *args])
    assert e.value.code == 2
    err = error_line(capsys)
    assert err.startswith("ctrlnet generate: error: ") and message in err, err


@pytest.mark.parametrize("args, message", [
    (["eval", "--control", "model=nano-canny", "--data", "d", "--out", "o", "--steps", "0"], "--steps: 0"),
    (["serve", "--port", "70000"], "--port: 70000 is not an integer in [0, 65535]"),
    (["serve", "--max-side", "0"], "--max-side: 0"),
    (["serve", "--queue", "-1"], "--queue: -1"),
    (["data", "shapes", "--n", "0", "--out", "o"], "--n: 0 is not an integer"),
    (["annotate", "--annotator", "canny", "x.png", "--out", "o", "--workers", "0"], "--workers: 0"),
])
def test_other_commands_numbers_are_checked_too(capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and message in error_line(capsys)


def test_control_numbers_fail_before_loading_models(capsys, monkeypatch):
    monkeypatch.setattr(cli.Pipeline, "from_pretrained", lambda *a, **k: pytest.fail("models loaded"))
    for spec, message in [("model=nano-canny,image=x.png,scale=nan", "scale: nan is not a number in [0, 10]"),
                          ("model=nano-canny,image=x.png,scale=1/1e9", "scale: 1000000000.0 is not a number"),
                          ("model=nano-canny,image=x.png,end=inf", "end: inf is not a number in [0, 1]")]:
        assert main(["generate", "--prompt", "x", "--control", spec]) == 2
        assert message in error_line(capsys)


def test_seed_minus_one_is_drawn_printed_and_recorded(tmp_path, capsys):
    assert main(["generate", "--prompt", "a red circle", "--steps", "1", "--seed", "-1",
                 "--out", str(tmp_path / "r.png")]) == 0
    err = capsys.readouterr().err
    seed = int(err.split("seed -1 drew ")[1].split()[0])
    assert f"Seed: {seed}," in Image.open(tmp_path / "r.png").text["parameters"]


# ---------------------------------------------------------------------- --control syntax

def test_control_values_in_quotes_keep_their_commas(tmp_path, maps, capsys):
    assert split_control('model=nano-canny,image="a,b.png",scale=0.5') == \
        [("model", "nano-canny"), ("image", "a,b.png"), ("scale", "0.5")]
    assert split_control("model=m, image=' a, b.png' ") == [("model", "m"), ("image", " a, b.png")]
    assert split_control("model=m,image=bob's.png") == [("model", "m"), ("image", "bob's.png")]  # not a quote
    for spec, message in [('model=m,image="a,b.png', "the quote \" after image= is never closed"),
                          ('model=m,image="a"b.png', "'b.png' follows the quoted value of image"),
                          ("model=m,a,b.png", "'a' is not key=value")]:
        with pytest.raises(ValueError, match=message):
            parse_control(spec)
    path = tmp_path / "edges, v2.png"
    Image.fromarray(maps["canny"]).save(path)
    assert main(["generate", "--prompt", "a red circle", "--steps", "1", "--out", str(tmp_path / "q.png"),
                 "--control", f'model=nano-canny,image="{path}",scale=0.5']) == 0
    assert "Weight: 0.5" in Image.open(tmp_path / "q.png").text["parameters"]


# ---------------------------------------------------------------------- --out

def user_comment(path) -> str:
    """The EXIF UserComment as A1111 reads it (piexif: "UNICODE\\0" + UTF-16 big-endian)."""
    raw = Image.open(path).getexif().get_ifd(0x8769)[0x9286]
    assert raw[:8] == b"UNICODE\0"
    return raw[8:].decode("utf-16-be")


def test_out_names_the_file_and_its_format(tmp_path, capsys):
    args = ["generate", "--prompt", "a red circle", "--steps", "1"]
    assert main([*args, "--num-images", "2", "--grid", "--out", str(tmp_path / "x.jpg")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x-000.jpg", "x-001.jpg", "x-grid.jpg"]
    for i in range(2):
        image = Image.open(tmp_path / f"x-00{i}.jpg")
        assert image.format == "JPEG" and image.size == (128, 128)
        comment = user_comment(tmp_path / f"x-00{i}.jpg")
        assert comment.startswith("a red circle\nSteps: 1, ") and f"Seed: {i}," in comment
    assert Image.open(tmp_path / "x-grid.jpg").format == "JPEG"
    assert main([*args, "--out", str(tmp_path / "w" / "one.webp")]) == 0
    assert Image.open(tmp_path / "w" / "one.webp").format == "WEBP"
    assert "Seed: 0," in user_comment(tmp_path / "w" / "one.webp")
    assert main([*args, "--grid", "--out", str(tmp_path / "p" / "a.PNG")]) == 0
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["a-grid.PNG", "a.PNG"]
    assert "Seed: 0," in Image.open(tmp_path / "p" / "a.PNG").text["parameters"]
    capsys.readouterr()  # the progress bars so far
    assert main([*args, "--out", str(tmp_path / "x.gif")]) == 2
    assert ".gif is not a supported format" in error_line(capsys)
    assert not (tmp_path / "x.gif").exists()


# ---------------------------------------------------------------------- warnings and errors

@pytest.mark.skipif(torch.cuda.is_available(), reason="the warning is about fp16 on a CPU")
def test_our_warnings_are_shown(tmp_path, capsys):
    """Pipeline.from_pretrained warns that fp16 is slow on a CPU; the CLI used to silence it."""
    assert main(["generate", "--prompt", "x", "--steps", "1", "--dtype", "fp16", "--out",
                 str(tmp_path / "h.png")]) == 0
    err = capsys.readouterr().err
    assert "ctrlnet generate: warning: fp16 on a CPU is very slow" in err


def test_errors_lose_terminal_codes_and_repeated_paths(capsys, monkeypatch):
    def failing(path):
        raise CheckpointError(f"\x1b[1;31m{path}: {path}: cannot read\x1b[0m this:\n  \x1b[33mdetails\x1b[0m")
    monkeypatch.setattr(cli, "inspect_control", failing)
    assert main(["inspect", "/models/x.pth"]) == 2
    err = error_line(capsys)
    assert err == "ctrlnet inspect: error: /models/x.pth: cannot read this: details\n"


# ---------------------------------------------------------------------- EXIF orientation

def test_a_sideways_jpeg_gives_an_upright_image_and_condition(tmp_path, maps):
    """A phone photo stored sideways with EXIF orientation 6: the size follows the upright aspect
    (portrait, 128x256) and the condition map (the grid's first cell) is the upright image."""
    upright = np.concatenate([maps["segmentation"], maps["segmentation"][::-1]], axis=0)  # (256, 128, 3)
    exif = Image.Exif()
    exif[0x0112] = 6  # "turn 90 degrees clockwise to view"
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1))).save(buf, format="JPEG", quality=95, exif=exif)
    (tmp_path / "photo.jpg").write_bytes(buf.getvalue())
    stored = np.asarray(Image.open(tmp_path / "photo.jpg").convert("RGB"))  # as a decoder ignoring the tag
    assert stored.shape == (128, 256, 3)
    assert main(["generate", "--prompt", "a red circle", "--steps", "1", "--grid", "--out", str(tmp_path / "e.png"),
                 "--control", f"model=nano-segmentation,image={tmp_path / 'photo.jpg'}"]) == 0
    assert Image.open(tmp_path / "e.png").size == (128, 256)
    grid = np.asarray(Image.open(tmp_path / "e-grid.png").convert("RGB")).astype(int)
    assert grid.shape == (256, 256, 3)
    condition = grid[:, :128]
    assert np.abs(condition - np.rot90(stored, -1)).max() <= 1  # float round trip
    assert np.abs(condition - upright).mean() < 8  # the JPEG's loss only: the right way up


# ---------------------------------------------------------------------- every kind of control network

def test_union_pairs_parse_and_repeated_keys_are_named():
    c = parse_control("model=u,image=a.png,type=canny,image=b.png,type=depth,scale=0.8")
    assert c.type == ["canny", "depth"] and c.image == ["a.png", "b.png"] and c.multi and not c.per_prompt
    c = parse_control("model=u,image=a.png,type=canny,annotator=canny,image=b.png,type=depth,annotator=depth_midas")
    assert c.annotator == ["canny", "depth_midas"]
    assert parse_control("model=u,image=a.png,type=3").type == "3"
    for spec, message in [("model=u,scale=1,scale=2", "scale= given twice"),
                          ("model=u,image=a.png,image=b.png", "repeats without several type=")]:
        with pytest.raises(ValueError, match=message):
            parse_control(spec)


def test_control_lora_and_adapter_on_the_command_line(tmp_path, maps, capsys):
    """A Control-LoRA and a T2I-Adapter for the nano base: inspect names the kind, convert needs the base for
    a Control-LoRA, and generate takes both in --control units beside a bundled ControlNet."""
    from ctrlnet.base import load_base
    from ctrlnet.formats import load_control
    from ctrlnet.formats.adapter_io import save_adapter
    from ctrlnet.formats.control_lora_io import save_control_lora
    from ctrlnet.models.adapter import adapter_for_unet
    from ctrlnet.models.control_lora import ControlLoRA
    import json
    unet = load_base("nano").unet
    lora = ControlLoRA.from_unet(unet, rank=4)
    with torch.no_grad():
        lora.controlnet_mid_block.weight.normal_(0, 0.1)
    path = save_control_lora(lora, tmp_path / "cl.safetensors")
    adapter = save_adapter(adapter_for_unet(dict(unet.config), num_res_blocks=1), tmp_path / "adapter")
    assert main(["inspect", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "control_lora" and info["rank"] == 4
    assert main(["inspect", str(adapter)]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "t2i_adapter"
    assert main(["convert", str(path), "--to", "diffusers", "--out", str(tmp_path / "full")]) == 2
    assert "give its base with --base" in error_line(capsys)
    assert main(["convert", str(path), "--to", "diffusers", "--out", str(tmp_path / "full"), "--base", "nano"]) == 0
    assert type(load_control(tmp_path / "full")).__name__ == "ControlNet"
    edges = tmp_path / "edges.png"
    Image.fromarray(maps["canny"]).save(edges)
    out = tmp_path / "mixed.png"
    assert main(["generate", "--prompt", "a red circle", "--steps", "1", "--out", str(out),
                 "--control", f"model={path},image={edges}", "--control", f"model={adapter},image={edges},scale=0.5",
                 "--control", f"model=nano-canny,image={edges}"]) == 0
    params = Image.open(out).text["parameters"]
    assert "cl.safetensors" in params and "Model: " + str(adapter) in params

"""Neural annotators through the user's commands, with random weights in the published layouts
found through $CTRLNET_ANNOTATORS: `ctrlnet annotators` (found where / not found), `ctrlnet
annotate` (batched, equal to one image at a time, a bad file failing alone, DWPose keypoints JSON,
missing weights refused before any work), `generate ... annotator=` and a training config."""

import json

import numpy as np
import pytest
from PIL import Image

from ctrlnet import cli
from ctrlnet.annotators import dwpose, get_annotator, hed
from ctrlnet.annotators import weights as W
from ctrlnet.cli import main
from detector_fixtures import one_torch_thread  # noqa: F401 (fixtures)


@pytest.fixture(autouse=True)
def places(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("CTRLNET_ANNOTATORS", str(tmp_path / "weights"))
    monkeypatch.setattr(cli, "retain_freed_memory", lambda: None)
    W.clear_cache()
    yield tmp_path
    W.clear_cache()


def photos(folder, sizes=((64, 96), (64, 96), (96, 64))):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for k, (h, w) in enumerate(sizes):
        a = np.full((h, w, 3), 220, np.uint8)
        a[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = rng.integers(0, 255, 3)
        Image.fromarray(a).save(folder / f"p{k}.png")
    return folder


def test_missing_weights_stop_annotate_before_any_work(places, capsys):
    src = photos(places / "in")
    assert main(["annotate", "--annotator", "softedge_hed", str(src), "--out", str(places / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "ControlNetHED.pth" in err and "not found" in err
    assert "huggingface.co/lllyasviel/Annotators" in err and not (places / "out").exists()


def test_annotators_lists_found_and_missing(places, capsys):
    hed.write_random_weights(places / "weights")
    assert main(["annotators", "--json", "softedge_hed", "softedge_pidinet", "canny"]) == 0
    entries = {e["name"]: e for e in json.loads(capsys.readouterr().out)}
    assert entries["softedge_hed"]["available"]
    assert entries["softedge_hed"]["weights"][0]["found"] == str(places / "weights" / "ControlNetHED.pth")
    assert not entries["softedge_pidinet"]["available"] and entries["softedge_pidinet"]["weights"][0]["found"] is None
    assert "table5_pidinet.pth" in entries["softedge_pidinet"]["reason"]
    assert entries["canny"]["available"] and entries["canny"]["weights"] == []
    assert entries["softedge_hed"]["params"]["model"] == {"default": "", "valid": "a string (a path)"}
    assert main(["annotators", "softedge_pidinet"]) == 0
    out = capsys.readouterr().out
    assert "softedge_pidinet: unavailable" in out and "not found (published at lllyasviel/Annotators)" in out


def test_annotate_batches_equal_single_images_and_a_bad_file_fails_alone(places, capsys):
    hed.write_random_weights(places / "weights")
    src = photos(places / "in")
    (src / "broken.png").write_bytes(b"not a png")
    assert main(["annotate", "--annotator", "softedge_hed", str(src), "--out", str(places / "out")]) == 1
    single = get_annotator("softedge_hed")
    for k in range(3):
        made = np.asarray(Image.open(places / "out" / f"p{k}.png").convert("RGB"))
        assert np.array_equal(made, single(np.asarray(Image.open(src / f"p{k}.png").convert("RGB"))))
    err = capsys.readouterr().err
    assert "broken.png" in err and not (places / "out" / "broken.png").exists()


def test_annotate_dwpose_writes_maps_and_openpose_json(places):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    dwpose.write_random_weights(places / "weights")
    src = photos(places / "in", sizes=((128, 96), (128, 96)))
    assert main(["annotate", "--annotator", "dw_openpose_full", str(src), "--out", str(places / "out")]) == 0
    for k in range(2):
        keys = json.loads((places / "out" / f"p{k}.json").read_text())
        assert keys["canvas_width"] == 96 and keys["canvas_height"] == 128
        image = np.asarray(Image.open(src / f"p{k}.png").convert("RGB"))
        people = dwpose.detect_people(image)
        assert len(keys["people"]) == len(people)
        made = np.asarray(Image.open(places / "out" / f"p{k}.png").convert("RGB"))
        assert np.array_equal(made, get_annotator("dw_openpose_full")(image))


def test_generate_and_train_config_with_a_neural_annotator(places, capsys):
    from ctrlnet.training.config import ConfigError, TrainConfig
    src = photos(places / "in", sizes=((64, 64),))
    args = ["generate", "--prompt", "a red circle", "--steps", "1", "--width", "64", "--height", "64",
            "--control", f"model=nano-canny,image={src / 'p0.png'},annotator=softedge_hed",
            "--out", str(places / "gen.png")]
    assert main(args) == 2
    assert "ControlNetHED.pth" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="ControlNetHED.pth"):
        TrainConfig(data=str(src), annotator="softedge_hed").validate()
    hed.write_random_weights(places / "weights")
    assert main(args) == 0 and (places / "gen.png").is_file()
    TrainConfig(data=str(src), annotator="softedge_hed").validate()


def test_a_bad_weight_file_is_one_error_not_one_per_image(places, capsys):
    src = photos(places / "in")
    (places / "weights").mkdir()
    (places / "weights" / "ControlNetHED.pth").write_bytes(b"PK\x03\x04 truncated")
    assert main(["annotate", "--annotator", "softedge_hed", str(src), "--out", str(places / "out")]) == 2
    errors = [l for l in capsys.readouterr().err.splitlines() if "error" in l or "failed" in l]
    assert len(errors) == 1 and "ControlNetHED.pth" in errors[0] and "could not be read" in errors[0]


def test_a_control_checks_its_detector_before_anything_loads(places):
    from ctrlnet.annotators import WeightsNotFound
    from ctrlnet.pipeline import Control
    control = Control(model="nano-canny", image=np.zeros((8, 8, 3), np.uint8), annotator="softedge_hed")
    with pytest.raises(WeightsNotFound, match="ControlNetHED.pth"):
        control.check()  # generate checks every unit before it loads the base
    hed.write_random_weights(places / "weights")
    control.check()

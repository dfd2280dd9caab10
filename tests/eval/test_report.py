"""`ctrlnet eval`: metrics with known answers, per-object ShapesWorld scores, and the report end to end."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ctrlnet.eval.control import region_miou, ssim
from ctrlnet.eval.report import evaluate
from ctrlnet.pipeline import Control
from ctrlnet.eval.shapes import colour_presence, score_objects
from ctrlnet.testbed.shapes import generate, render, sample_layout


def test_ssim_and_region_miou_known_answers():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 255, (32, 32), dtype=np.uint8)
    assert ssim(a, a) == pytest.approx(1.0)
    assert ssim(a, 255 - a) < 0
    truth = np.zeros((10, 10), np.uint8)
    truth[:, 5:] = 1  # two regions of 50 px
    assert region_miou(truth, truth) == 1.0
    assert region_miou(truth * 7 + 3, truth) == 1.0  # region colours need not match, only regions
    shifted = np.zeros_like(truth)
    shifted[:, 7:] = 1  # left region grows to 70 px, right one shrinks to 30
    # by hand: left IoU 50/70, right IoU 30/50
    assert region_miou(shifted, truth) == pytest.approx((50 / 70 + 30 / 50) / 2)
    assert region_miou(np.zeros_like(truth), truth) == pytest.approx((50 / 100 + 50 / 100) / 2)


def test_objects_score_perfectly_on_their_own_targets_and_worse_when_moved():
    for i in range(20):
        s = sample_layout(i, seed=5, size=128)
        maps = render(s, 128)
        record = json.loads(json.dumps({"background": s.background, "shapes": [vars(x) for x in s.shapes]}))
        scores = score_objects(maps["target"], record)
        assert all(o["iou"] > 0.95 and o["colour_ok"] and o["shape_ok"] for o in scores), (s.prompt, scores)
        moved = score_objects(np.roll(maps["target"], 20, axis=1), record)
        assert np.mean([o["iou"] for o in moved]) < np.mean([o["iou"] for o in scores]) - 0.2


def test_colour_presence_is_location_free_and_catches_missing_or_wrong_colours():
    for i in range(20):
        s = sample_layout(i, seed=5, size=128)
        maps = render(s, 128)
        record = json.loads(json.dumps({"background": s.background, "shapes": [vars(x) for x in s.shapes]}))
        assert all(colour_presence(maps["target"], record)), s.prompt
        # moved: every colour is still there (object IoU would drop; presence must not)
        assert all(colour_presence(np.roll(maps["target"], 20, axis=1), record)), s.prompt
        # the first object painted over with the background: its colour is gone (unless another has it)
        blank = maps["target"].copy()
        blank[render_mask(s, 0)] = s.background_rgb
        shared = sum(x.colour == s.shapes[0].colour for x in s.shapes) > 1
        if not shared:
            assert colour_presence(blank, record)[0] is False, s.prompt
        # the first object recoloured to a far palette colour: absent
        from ctrlnet.testbed.shapes import PALETTE
        other = max(PALETTE, key=lambda n: np.linalg.norm(np.subtract(PALETTE[n], s.shapes[0].rgb)))
        if other != s.background and all(x.colour != other for x in s.shapes) and not shared:
            recoloured = maps["target"].copy()
            recoloured[render_mask(s, 0)] = PALETTE[other]
            assert colour_presence(recoloured, record)[0] is False


def render_mask(sample, j):
    from ctrlnet.testbed.shapes import draw
    mask = np.zeros((128, 128), np.uint8)
    draw(mask, sample.shapes[j], 255)
    return mask > 0


@pytest.fixture(scope="module")
def val(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("eval") / "val", 12, seed=9, size=128, workers=1, progress=False)


def test_report_end_to_end_with_a_checkpoint_curve(val, tmp_path):
    from ctrlnet.base import load_base
    from ctrlnet.formats import save_controlnet
    from ctrlnet.models import ControlNet
    from ctrlnet.testbed import NANO_SD
    unet = load_base(NANO_SD).unet
    for step in (100, 200):  # two "checkpoints": the second one's zero convs moved off zero
        net = ControlNet.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 64, 128))
        if step == 200:
            with torch.no_grad():
                net.controlnet_mid_block.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
        save_controlnet(net, tmp_path / "ckpts" / f"step-{step:06d}")
    out = tmp_path / "report"
    report = evaluate("nano", [Control(str(tmp_path / "ckpts" / "step-*"), annotator="canny")], val, out,
                      n=3, seeds=2, steps=2, progress=False)
    assert [r["step"] for r in report["results"]] == [100, 200]
    for r in report["results"] + [{"metrics": report["baseline"]}]:
        m = r["metrics"]
        assert {"control0_edge_f1", "mask_iou", "object_iou", "colour_accuracy", "shape_accuracy"} <= set(m)
        assert all(0 <= v <= 1 for v in m.values())
    # a zero-initialised ControlNet changes nothing: its scores are the baseline's
    assert report["results"][0]["metrics"] == report["baseline"]
    assert report["images_per_config"] == 6 and json.loads((out / "report.json").read_text())["n"] == 3
    for f in ("report.md", "samples.png", "bars.png", "curves.png"):
        assert (out / f).stat().st_size > 100
    assert "without control" in (out / "report.md").read_text()


def test_two_nets_each_for_one_object_and_errors(val, tmp_path):
    exe = Path(sys.executable).parent / "ctrlnet"
    r = subprocess.run([str(exe), "eval", "--control", "model=nano-canny,annotator=canny",
                        "--control", "model=nano-segmentation,condition=segmentation", "--split-objects",
                        "--data", str(val), "--n", "2", "--steps", "2", "--no-baseline", "--out", str(tmp_path / "r")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    metrics = json.loads((tmp_path / "r" / "report.json").read_text())["results"][0]["metrics"]
    assert {"object0_iou", "object1_iou", "control0_edge_f1"} <= set(metrics)
    r = subprocess.run([str(exe), "eval", "--control", "model=nano-canny,condition=depth", "--data", str(val),
                        "--n", "1", "--steps", "1", "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert r.returncode == 2 and "no metadata column 'depth'" in r.stderr and "Traceback" not in r.stderr


def test_regions_give_each_object_its_own_prompt(val, tmp_path):
    from ctrlnet.eval.report import load_samples, object_regions
    sample = next(s for s in load_samples(val, 50) if len(s["columns"]["shapes"]) >= 2)
    regions = object_regions(sample["columns"], 128)
    shapes = sample["columns"]["shapes"]
    assert len(regions) == len(shapes)
    for r, s in zip(regions, shapes):
        assert f"{s['colour']} {s['shape']} on a" in r.prompt and r.prompt.endswith(" background")
        x, y = min(int(s["cx"]), 127), min(int(s["cy"]), 127)
        assert r.mask[y, x] == 255 and 0 < (r.mask > 0).mean() < 0.5  # the mask sits on its object
    report = evaluate("nano", [Control("nano-canny", annotator="canny")], val, tmp_path / "r", n=2, steps=2,
                      progress=False, regions=True)
    assert report["regions"] is True and "colour_accuracy" in report["results"][0]["metrics"]


def test_compiled_eval_scores_like_eager(val, tmp_path):
    """evaluate(compile=...) (`ctrlnet eval --compile`): the same scores as the eager run, through
    the compiled UNet and ControlNet (aot_eager: dynamo's capture without code generation, fast)."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    units = [Control("nano-canny", annotator="canny")]
    eager = evaluate("nano", units, val, tmp_path / "eager", n=2, steps=2, progress=False, baseline=False)
    torch._dynamo.reset()
    counters.clear()
    try:
        compiled = evaluate("nano", units, val, tmp_path / "compiled", n=2, steps=2, progress=False, baseline=False,
                            compile={"backend": "aot_eager", "dynamic": False})
        assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]  # the net; the UNet
    finally:
        torch._dynamo.reset()
    assert compiled["settings"]["compile"] == {"backend": "aot_eager", "dynamic": False}
    got, want = compiled["results"][0]["metrics"], eager["results"][0]["metrics"]
    assert got.keys() == want.keys() and all(abs(got[k] - want[k]) <= 0.02 for k in want), (got, want)


def test_openvino_eval_scores_like_torch(val, tmp_path, monkeypatch):
    """evaluate(backend="openvino") (`ctrlnet eval --backend openvino`): the same scores as the torch
    path (f32), the backend recorded in the report."""
    pytest.importorskip("openvino", reason="the openvino extra (make test installs it)")
    monkeypatch.setenv("CTRLNET_OPENVINO_CACHE", str(tmp_path / "openvino-cache"))
    units = [Control("nano-canny", annotator="canny")]
    eager = evaluate("nano", units, val, tmp_path / "torch", n=2, steps=2, progress=False, baseline=False)
    ov = evaluate("nano", units, val, tmp_path / "openvino", n=2, steps=2, progress=False, baseline=False,
                  backend="openvino")
    assert ov["settings"]["backend"] == "openvino" and eager["settings"]["backend"] == "torch"
    got, want = ov["results"][0]["metrics"], eager["results"][0]["metrics"]
    assert got.keys() == want.keys() and all(abs(got[k] - want[k]) <= 0.02 for k in want), (got, want)
    assert any(p.name.startswith("unet-") for p in (tmp_path / "openvino-cache").iterdir())


def test_eval_takes_every_kind(val, tmp_path):
    """A Control-LoRA (zero deltas and zero convolutions: no control yet), a T2I-Adapter and a Union net
    for the nano base, evaluated as ControlNets are: a Control-LoRA at its start scores as the baseline."""
    from ctrlnet.base import load_base
    from ctrlnet.formats import save_controlnet
    from ctrlnet.formats.adapter_io import save_adapter
    from ctrlnet.formats.control_lora_io import save_control_lora
    from ctrlnet.models.adapter import adapter_for_unet
    from ctrlnet.models.control_lora import ControlLoRA
    from ctrlnet.models.union import ControlNetUnion
    from ctrlnet.testbed import NANO_SD
    unet = load_base(NANO_SD).unet
    lora = save_control_lora(ControlLoRA.from_unet(unet, rank=4), tmp_path / "cl.safetensors")
    torch.manual_seed(0)
    adapter = save_adapter(adapter_for_unet(dict(unet.config), num_res_blocks=1), tmp_path / "adapter")
    union_net = ControlNetUnion.from_unet(unet, 6)
    with torch.no_grad():
        union_net.controlnet_mid_block.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    union = save_controlnet(union_net, tmp_path / "union")
    units = [Control(str(lora), annotator="canny"), Control(str(adapter), annotator="canny", scale=0.5),
             Control(str(union), annotator="canny", type="canny")]
    report = evaluate("nano", units[:1], val, tmp_path / "lora", n=2, steps=2, progress=False)
    assert report["results"][0]["metrics"] == report["baseline"]
    for unit in units[1:]:  # each acts
        report = evaluate("nano", [unit], val, tmp_path / "one", n=2, steps=2, progress=False)
        assert report["results"][0]["metrics"] != report["baseline"] and "control0_edge_f1" in report["baseline"]
    with pytest.raises(ValueError, match="pairs in one unit are not evaluated"):
        evaluate("nano", [Control(str(union), image=["a", "b"], type=["canny", "depth"])], val, tmp_path / "m", n=2)

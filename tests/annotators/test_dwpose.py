"""DWPose (dw_openpose_full / dw_openpose) without the real weights: small ONNX models with the
published input / output names and shapes whose outputs are known (a detector output holding known
boxes, SimCC maps peaked at known bins) -> the decoded boxes, keypoints and drawn pixels are known.

The real files (https://huggingface.co/yzd-v/DWPose) are ONNX graphs, not state dicts: what a stand-in
must share with them is the I/O contract read from the reference (A1111 ``annotator/openpose/
cv_ox_det.py`` / ``cv_ox_pose.py``): yolox_l.onnx ``images`` 1x3x640x640 -> ``output`` 1x8400x85,
dw-ll_ucoco_384.onnx ``input`` Nx3x384x288 -> ``simcc_x`` Nx133x576, ``simcc_y`` Nx133x768."""

import os
import pickle

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from ctrlnet.annotators import BATCH, NEEDS, PARAMS, check_params, dwpose, get_annotator, unavailable  # noqa: E402
from ctrlnet.annotators import weights as W  # noqa: E402
from ctrlnet.annotators.pose import BODY_COLOURS, openpose_json  # noqa: E402
from ctrlnet.annotators.weights import WeightsError, WeightsNotFound  # noqa: E402

FIRST32 = 80 * 80 + 40 * 40  # the first stride-32 anchor (20 x 20 cells follow)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No real home, annotator folder or hub cache is ever searched."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CTRLNET_ANNOTATORS", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    W.clear_cache()
    yield
    W.clear_cache()


def anchor(out, gx, gy, w, h, obj, cls=0, score=1.0, dx=0.5, dy=0.5):
    """Put a box of (w, h) px at 640 on stride-32 cell (gx, gy) of a (8400, 85) detector output."""
    k = FIRST32 + gy * 20 + gx
    out[k, :4] = dx, dy, np.log(w / 32), np.log(h / 32)
    out[k, 4], out[k, 5 + cls] = obj, score
    return k


def one_person_detector():
    """One person (score 0.81) at (128, 80, 224, 208) at 640, i.e. (64, 40, 112, 104) in a 320 x 320
    image; a weaker duplicate NMS removes; a car; a person under 0.3."""
    out = np.zeros((8400, 85), np.float32)
    anchor(out, 5, 4, 96, 128, 0.9, score=0.9)
    anchor(out, 6, 4, 96, 120, 0.8, score=0.9, dx=-0.4)  # IoU > 0.45 with the first: suppressed
    anchor(out, 15, 15, 64, 64, 0.9, cls=2, score=0.9)  # a car
    anchor(out, 1, 15, 64, 64, 0.5, score=0.5)  # a person at 0.25
    return out


def bins(x, y, box=(64, 40, 112, 104)):
    """The SimCC bins (x of 576, y of 768) that decode to image point (x, y) for ``box``."""
    centre, scale = dwpose.box_to_crop(np.array(box, np.float64))
    return (int(round((x - centre[0] + scale[0] / 2) / scale[0] * 288 * 2)),
            int(round((y - centre[1] + scale[1] / 2) / scale[1] * 384 * 2)))


# COCO-WholeBody index -> image point, for the box above (its crop is 60 x 80 px: 48 bins = 5 px)
KNOWN = {0: (88, 42), 1: (93, 37), 2: (83, 37), 5: (98, 52), 6: (78, 52), 91: (108, 82), 92: (108, 92),
         23: (88, 47)}


def peaked_maps(points=KNOWN, box=(64, 40, 112, 104), weak=(9,)):
    sx, sy = np.zeros((133, 576), np.float32), np.zeros((133, 768), np.float32)
    for k, (x, y) in points.items():
        bx, by = bins(x, y, box)
        sx[k, bx], sy[k, by] = 1.0, 0.9  # score: the smaller maximum, 0.9
    for k in weak:  # seen by the model, but under min_confidence 0.3
        sx[k, 300], sy[k, 300] = 0.2, 0.2
    return sx, sy


def save(folder, det=None, pose=None, **pose_kw):
    """Both stand-ins in ``folder``, which becomes ``$CTRLNET_ANNOTATORS`` (the detector is looked
    for there; ``model=`` names only the pose model)."""
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["CTRLNET_ANNOTATORS"] = str(folder)  # the fixture's monkeypatch restores it
    onnx.save(dwpose.detector_model(one_person_detector() if det is None else det), str(folder / "yolox_l.onnx"))
    sx, sy = peaked_maps() if pose is None else pose
    onnx.save(dwpose.pose_model(sx, sy, **pose_kw), str(folder / "dw-ll_ucoco_384.onnx"))
    return folder


def grey(h=320, w=320, value=128):
    return np.full((h, w, 3), value, np.uint8)


# --- 1. the published I/O contract -------------------------------------------------------------

def test_random_weights_have_the_published_names_shapes_and_load(tmp_path):
    import onnxruntime as ort
    dwpose.write_random_weights(tmp_path / "w", seed=1)
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["dw-ll_ucoco_384.onnx", "yolox_l.onnx"]
    det = ort.InferenceSession(str(tmp_path / "w/yolox_l.onnx"), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in det.get_inputs()] == [("images", [1, 3, 640, 640])]
    assert [(o.name, o.shape) for o in det.get_outputs()] == [("output", [1, 8400, 85])]
    pose = ort.InferenceSession(str(tmp_path / "w/dw-ll_ucoco_384.onnx"), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in pose.get_inputs()] == [("input", ["batch", 3, 384, 288])]
    assert [(o.name, o.shape) for o in pose.get_outputs()] == [("simcc_x", ["batch", 133, 576]),
                                                               ("simcc_y", ["batch", 133, 768])]
    p = dwpose.load_pose(tmp_path / "w/dw-ll_ucoco_384.onnx", "t")
    d = dwpose.load_detector(tmp_path / "w/yolox_l.onnx", "t")
    assert (p.batch, p.size, p.outputs) == (True, (288, 384), ["simcc_x", "simcc_y"])
    assert (d.batch, d.size) == (False, (640, 640))
    dwpose.write_random_weights(tmp_path / "again", seed=1)  # seeded: the same bytes
    assert (tmp_path / "again/yolox_l.onnx").read_bytes() == (tmp_path / "w/yolox_l.onnx").read_bytes()


def test_registered_with_its_extra_parameters_and_batch():
    for name in ("dw_openpose_full", "dw_openpose"):
        assert NEEDS[name] == "onnxruntime" and name in BATCH
        assert set(PARAMS[name]) == {"model", "min_person_score", "min_confidence"}
    assert check_params("dw_openpose_full", {"min_confidence": 0.5}) == {"min_confidence": 0.5}
    with pytest.raises(ValueError, match="min_person_score"):
        check_params("dw_openpose_full", {"min_person_score": 1.5})


# --- 2. pre / post-processing with known answers -----------------------------------------------

def test_letterbox_scales_into_the_top_left_on_grey():
    x, r = dwpose.letterbox(grey(160, 320, 10))
    assert r == 2.0 and x.shape == (3, 640, 640) and x.dtype == np.float32
    assert (x[:, :320] == 10).all() and (x[:, 320:] == 114).all()


def test_detector_decoding_nms_and_person_filter():
    boxes = dwpose.person_boxes(one_person_detector(), r=2.0)
    np.testing.assert_allclose(boxes, [[64, 40, 112, 104]], atol=1e-4)  # the duplicate, car and weak one gone
    assert len(dwpose.person_boxes(one_person_detector(), 2.0, min_person_score=0.2)) == 2  # the weak one too
    assert dwpose.person_boxes(np.zeros((8400, 85), np.float32), 2.0) is None  # nothing at all
    only_car = np.zeros((8400, 85), np.float32)
    anchor(only_car, 15, 15, 64, 64, 0.9, cls=2, score=0.9)
    assert dwpose.person_boxes(only_car, 2.0).shape == (0, 4)  # candidates, no person


def test_crop_and_simcc_decoding_map_bins_back_to_the_image():
    centre, scale = dwpose.box_to_crop(np.array([64, 40, 112, 104.0]))
    np.testing.assert_allclose(centre, [88, 72]) and np.testing.assert_allclose(scale, [60, 80])
    centre2, scale2 = dwpose.box_to_crop(np.array([0, 0, 100, 100.0]))  # widened to 288:384
    np.testing.assert_allclose(scale2, [125, 125 / 0.75])
    m = dwpose.crop_matrix(centre, scale)
    np.testing.assert_allclose(m, [[4.8, 0, 144 - 4.8 * 88], [0, 4.8, 192 - 4.8 * 72]], atol=1e-4)
    sx, sy = np.zeros((1, 2, 576), np.float32), np.zeros((1, 2, 768), np.float32)
    sx[0, 0, 288], sy[0, 0, 384] = 0.7, 0.5  # the crop's centre, score min(0.7, 0.5)
    sx[0, 1, 10], sy[0, 1, 10] = -0.1, 0.4  # max <= 0: location -1
    locs, vals = dwpose.decode_simcc(sx, sy)
    np.testing.assert_allclose(locs[0], [[144, 192], [-0.5, -0.5]]) and np.testing.assert_allclose(vals[0], [0.5, -0.1])
    np.testing.assert_allclose(dwpose.crop_to_image(locs[0, :1], centre, scale), [[88, 72]])
    # the crop itself: an image bright inside the box, dark outside -> the crop's middle is bright
    image = np.zeros((320, 320, 3), np.uint8)
    image[40:104, 64:112] = 255
    x = dwpose.crop(image, centre, scale)
    assert x.shape == (3, 384, 288) and x.dtype == np.float32
    np.testing.assert_allclose(x[:, 192, 144], (255 - dwpose.MEAN) / dwpose.STD, rtol=1e-5)
    np.testing.assert_allclose(x[:, 5, 5], -dwpose.MEAN / dwpose.STD, rtol=1e-5)


def test_wholebody_to_openpose_order_neck_hands_face():
    kp = np.arange(133 * 2, dtype=np.float64).reshape(133, 2)
    scores = np.full(133, 0.9)
    scores[7] = 0.1  # l-elbow unseen
    scores[112:133] = 0.0  # no right hand
    person = dwpose.to_openpose(kp, scores)
    body = person["body"]
    for op, wb in enumerate([0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3]):
        if wb is None:
            np.testing.assert_allclose(body[1, :2], kp[[5, 6]].mean(0))
        elif wb == 7:
            assert body[op, 2] == 0
        else:
            np.testing.assert_allclose(body[op], [*kp[wb], 0.9], rtol=1e-6)
    np.testing.assert_allclose(person["left_hand"][:, :2], kp[91:112])
    assert "right_hand" not in person
    np.testing.assert_allclose(person["face"][:68, :2], kp[23:91])
    np.testing.assert_array_equal(person["face"][68:], body[[14, 15]])  # eyes as the pupils
    scores[5] = 0.3  # neck needs both shoulders OVER the threshold (the reference's >), others >=
    person = dwpose.to_openpose(kp, scores)
    assert person["body"][1, 2] == 0 and person["body"][5, 2] == pytest.approx(0.3)
    assert set(dwpose.to_openpose(kp, scores, hands=False, face=False)) == {"body"}


def test_end_to_end_known_keypoints_pixels_and_json(tmp_path, monkeypatch):
    save(tmp_path / "w")
    people = dwpose.detect_people(grey())
    assert len(people) == 1
    (person,) = people
    body = person["body"]
    want = {0: (88, 42), 1: (88, 52), 2: (78, 52), 5: (98, 52), 14: (83, 37), 15: (93, 37)}
    for k in range(18):
        if k in want:
            np.testing.assert_allclose(body[k], [*want[k], 0.9], atol=1e-4)
        else:
            assert body[k, 2] == 0  # l-wrist (mmpose 9) scored 0.2: unseen; the rest never peaked
    np.testing.assert_allclose(person["left_hand"][:2, :2], [[108, 82], [108, 92]], atol=1e-4)
    assert (person["left_hand"][2:, 2] == 0).all() and "right_hand" not in person
    np.testing.assert_allclose(person["face"][0, :2], [88, 47], atol=1e-4)
    np.testing.assert_allclose(person["face"][68:, :2], [[83, 37], [93, 37]], atol=1e-4)

    out = get_annotator("dw_openpose_full")(grey())
    assert out.shape == (320, 320, 3) and out.dtype == np.uint8
    assert tuple(out[42, 88]) == BODY_COLOURS[0]  # nose dot
    assert tuple(out[52, 88]) == BODY_COLOURS[1]  # neck dot
    assert tuple(out[52, 78]) == BODY_COLOURS[2] and tuple(out[52, 98]) == BODY_COLOURS[5]
    assert tuple(out[52, 83]) == tuple(int(c * 0.6) for c in BODY_COLOURS[0])  # neck - r-shoulder limb
    assert tuple(out[37, 83]) == (255, 255, 255)  # the face's pupil over the eye's dot (as A1111)
    assert tuple(out[47, 88]) == (255, 255, 255)  # face point
    assert tuple(out[82, 108]) == (0, 0, 255) and tuple(out[87, 108]) == (255, 0, 0)  # hand dot, first bone
    assert out[150:].max() == 0  # nothing below the person
    body_only = get_annotator("dw_openpose")(grey())
    assert tuple(body_only[42, 88]) == BODY_COLOURS[0] and body_only[82, 108].max() == 0
    assert tuple(body_only[37, 83]) == BODY_COLOURS[14]  # no face drawn over the eye

    doc = openpose_json(people, 320, 320)
    (entry,) = doc["people"]
    assert entry["pose_keypoints_2d"][:3] == pytest.approx([88, 42, 0.9]) and len(entry["pose_keypoints_2d"]) == 54
    assert entry["hand_left_keypoints_2d"][:3] == pytest.approx([108, 82, 0.9])
    assert entry["hand_right_keypoints_2d"] == [0.0] * 63
    assert len(entry["face_keypoints_2d"]) == 210


def test_no_candidates_no_pose_but_other_objects_mean_the_whole_image(tmp_path):
    nothing = save(tmp_path / "a", det=np.zeros((8400, 85), np.float32))
    assert dwpose.detect_people(grey(), str(nothing / "dw-ll_ucoco_384.onnx")) == []
    assert dwpose.dw_openpose_full(grey(), str(nothing / "dw-ll_ucoco_384.onnx")).max() == 0
    car = np.zeros((8400, 85), np.float32)
    anchor(car, 15, 15, 64, 64, 0.9, cls=2, score=0.9)
    sx, sy = np.zeros((133, 576), np.float32), np.zeros((133, 768), np.float32)
    sx[0, 288], sy[0, 100] = 1, 1  # the nose, in the middle across, 100 bins down
    folder = save(tmp_path / "b", det=car, pose=(sx, sy))
    (person,) = dwpose.detect_people(grey(), str(folder / "dw-ll_ucoco_384.onnx"))
    # whole image (0, 0, 320, 320): crop 400 x 533.3 about (160, 160)
    np.testing.assert_allclose(person["body"][0, :2], [160, 50 / 384 * 400 / 0.75 + 160 - 200 / 0.75], atol=1e-3)
    # min_person_score over the person's 0.81: the same fallback (as A1111 at its fixed 0.3)
    (alone,) = dwpose.detect_people(grey(), str(save(tmp_path / "c", pose=(sx, sy)) / "dw-ll_ucoco_384.onnx"),
                                    min_person_score=0.9)
    np.testing.assert_allclose(alone["body"][0], person["body"][0])


def test_hand_and_face_points_under_one_pixel_are_kept_but_not_drawn():
    hand = np.zeros((21, 3), np.float32)
    hand[0], hand[1] = (0.5, 50, 1), (30, 50, 1)
    person = {"body": np.zeros((18, 3), np.float32), "right_hand": hand,
              "face": np.array([[40, 0.9, 1], [60, 60, 1]] + [[0, 0, 0]] * 68, np.float32)}
    out = dwpose.draw(100, 100, [person])
    assert out[50, 0:10].max() == 0 and tuple(out[50, 30]) == (0, 0, 255)  # no dot, no bone at x 0.5
    assert out[0:3, 40].max() == 0 and tuple(out[60, 60]) == (255, 255, 255)
    assert person["right_hand"][0, 2] == 1  # the keypoints themselves are untouched


def test_later_people_are_drawn_over_earlier_ones_hands_included():
    hand = np.zeros((21, 3), np.float32)
    hand[0] = (50, 50, 1)
    first = {"body": np.zeros((18, 3), np.float32), "left_hand": hand}
    body = np.zeros((18, 3), np.float32)
    body[0] = (50, 50, 1)
    second = {"body": body}
    assert tuple(dwpose.draw(100, 100, [first, second])[50, 50]) == BODY_COLOURS[0]
    assert tuple(dwpose.draw(100, 100, [second, first])[50, 50]) == (0, 0, 255)


# --- 3. bad files ------------------------------------------------------------------------------

def test_not_onnx_truncated_pickle_and_swapped_files_are_weights_errors(tmp_path, monkeypatch):
    folder = save(tmp_path / "w")
    text = tmp_path / "text/dw-ll_ucoco_384.onnx"
    text.parent.mkdir()
    text.write_text("not a model")
    with pytest.raises(WeightsError, match=r"text/dw-ll_ucoco_384\.onnx.*not an ONNX file.*expected dw-ll_ucoco_384"):
        dwpose.dw_openpose_full(grey(), str(text))
    cut = tmp_path / "cut.onnx"
    cut.write_bytes((folder / "yolox_l.onnx").read_bytes()[:100_000])
    with pytest.raises(WeightsError, match="cut.onnx could not be read"):
        dwpose.dw_openpose_full(grey(), str(cut))
    pickled = tmp_path / "pickled.onnx"
    pickled.write_bytes(pickle.dumps({"state_dict": {"w": object}}))
    with pytest.raises(WeightsError, match="pickled.onnx could not be read"):
        dwpose.dw_openpose_full(grey(), str(pickled))
    with pytest.raises(WeightsError, match=r"yolox_l\.onnx is not the DWPose whole-body.*images \[1, 3, 640, 640\]"):
        dwpose.dw_openpose_full(grey(), str(folder / "yolox_l.onnx"))  # the detector given as the pose model
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    (swapped / "yolox_l.onnx").write_bytes((folder / "dw-ll_ucoco_384.onnx").read_bytes())
    (swapped / "dw-ll_ucoco_384.onnx").write_bytes((folder / "dw-ll_ucoco_384.onnx").read_bytes())
    monkeypatch.setenv("CTRLNET_ANNOTATORS", str(swapped))
    with pytest.raises(WeightsError, match=r"swapped/yolox_l\.onnx is not the YOLOX-L COCO detector.*simcc_x"):
        dwpose.dw_openpose_full(grey())
    wrong_crop = tmp_path / "wrong_crop.onnx"  # SimCC maps that do not fit the input size
    onnx.save(dwpose.pose_model(*peaked_maps(), size=(192, 256)), str(wrong_crop))
    with pytest.raises(WeightsError, match="wrong_crop.onnx is not the DWPose"):
        dwpose.load_pose(wrong_crop, "t")


def test_missing_files_name_the_places_searched(tmp_path, monkeypatch):
    with pytest.raises(WeightsNotFound) as e:
        dwpose.dw_openpose_full(grey())
    msg = str(e.value)
    assert "dw-ll_ucoco_384.onnx" in msg and "$CTRLNET_ANNOTATORS (unset)" in msg and str(tmp_path / "home") in msg
    assert "models--yzd-v--DWPose" in msg and "https://huggingface.co/yzd-v/DWPose" in msg
    assert "dw-ll_ucoco_384.onnx" in unavailable("dw_openpose_full")
    only_pose = tmp_path / "only"
    only_pose.mkdir()
    (only_pose / "dw-ll_ucoco_384.onnx").write_bytes(b"x")
    monkeypatch.setenv("CTRLNET_ANNOTATORS", str(only_pose))
    with pytest.raises(WeightsNotFound, match=r"yolox_l\.onnx \(the YOLOX-L"):
        dwpose.dw_openpose_full(grey())
    assert "yolox_l.onnx" in unavailable("dw_openpose")


# --- 4. found where other tools keep them ------------------------------------------------------

def test_found_via_env_and_hub_cache(tmp_path, monkeypatch):
    dwpose.write_random_weights(tmp_path / "ann", seed=0)
    monkeypatch.setenv("CTRLNET_ANNOTATORS", str(tmp_path / "ann"))
    assert unavailable("dw_openpose_full") == ""
    from_env = get_annotator("dw_openpose_full")(grey(128, 96))
    monkeypatch.delenv("CTRLNET_ANNOTATORS")
    repo = tmp_path / "hub/models--yzd-v--DWPose"
    dwpose.write_random_weights(repo / "snapshots/abc123", seed=0)
    (repo / "refs").mkdir()
    (repo / "refs/main").write_text("abc123")
    assert W.locate(dwpose.POSE) == repo / "snapshots/abc123/dw-ll_ucoco_384.onnx"
    assert W.locate(dwpose.DETECTOR) == repo / "snapshots/abc123/yolox_l.onnx"
    W.clear_cache()
    np.testing.assert_array_equal(get_annotator("dw_openpose_full")(grey(128, 96)), from_env)


# --- 5. batch == single ------------------------------------------------------------------------

def images(n=3, h=96, w=128, seed=0):
    """Noise of different brightness (the stand-ins' boxes and keypoints move with the mean)."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 96, (h, w, 3)) + 70 * k).astype(np.uint8) for k in range(n)]


def test_batch_equals_single_in_one_pose_pass(tmp_path, monkeypatch):
    dwpose.write_random_weights(tmp_path / "w", seed=3)
    monkeypatch.setenv("CTRLNET_ANNOTATORS", str(tmp_path / "w"))
    ims = images()
    singles = [dwpose.dw_openpose_full(i) for i in ims]
    assert all(s.any() for s in singles) and not np.array_equal(singles[0], singles[1])
    passes = []
    run = dwpose.Net.run
    monkeypatch.setattr(dwpose.Net, "run", lambda self, x: passes.append((self.size, len(x))) or run(self, x))
    batched = BATCH["dw_openpose_full"](ims)
    people = [len(p) for p in dwpose.detect_people_many(ims)]
    assert [n for size, n in passes if size == (288, 384)][0] == sum(people) > 3  # every person in one pass
    assert [n for size, n in passes if size == (640, 640)][:3] == [1, 1, 1]  # the detector's batch is 1
    for a, b in zip(batched, singles):
        np.testing.assert_array_equal(a, b)
    through = get_annotator("dw_openpose_full", min_confidence=0.3)(ims)
    for a, b in zip(through, singles):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(BATCH["dw_openpose"](ims), [dwpose.dw_openpose(i) for i in ims]):
        np.testing.assert_array_equal(a, b)


def test_a_pose_model_of_batch_one_runs_crop_by_crop_with_the_same_result(tmp_path, monkeypatch):
    dwpose.write_random_weights(tmp_path / "w", seed=3)
    monkeypatch.setenv("CTRLNET_ANNOTATORS", str(tmp_path / "w"))
    rng = np.random.default_rng(7)
    sx, sy = rng.normal(0, 0.2, (133, 576)), rng.normal(0, 0.2, (133, 768))
    for folder, batch in (("dyn", "batch"), ("one", 1)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "yolox_l.onnx").write_bytes((tmp_path / "w/yolox_l.onnx").read_bytes())
        onnx.save(dwpose.pose_model(sx, sy, gain=0.05, batch=batch), str(tmp_path / folder / "dw-ll_ucoco_384.onnx"))
    ims = images(2)
    dynamic = BATCH["dw_openpose_full"](ims, model=str(tmp_path / "dyn/dw-ll_ucoco_384.onnx"))
    sizes = []
    run = dwpose.Net.run
    monkeypatch.setattr(dwpose.Net, "run", lambda self, x: sizes.append(len(x)) or run(self, x))
    one = BATCH["dw_openpose_full"](ims, model=str(tmp_path / "one/dw-ll_ucoco_384.onnx"))
    assert set(sizes) == {1} and len(sizes) > 4
    for a, b in zip(dynamic, one):
        np.testing.assert_array_equal(a, b)

"""Depth and normal annotators (depth_midas, normal_midas, depth_anything, depth_anything_v2):
the published MiDaS file's layout and its conversion to transformers' DPT-hybrid, pre- and
post-processing on known answers, weights found / refused, batch == single."""

import hashlib
import json
import math
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoImageProcessor, DPTConfig, DPTForDepthEstimation

from ctrlnet.annotators import depth as D
from ctrlnet.annotators import get_annotator, unavailable, weights
from ctrlnet.annotators.weights import WeightsError, WeightsNotFound
from detector_fixtures import isolated, one_torch_thread  # noqa: F401 (fixtures)

# The published dpt_hybrid-midas-501f0c75.pt = the state dict of ControlNet's (and isl-org/MiDaS's)
# DPTDepthModel(backbone="vitb_rn50_384"), which loads it strictly. Numbers from instantiating that
# class (ControlNet-v1-1-nightly annotator/midas/midas, with timm 0.6.12, ControlNet's pin) in a
# scratch script: 368 tensors, 123,146,985 parameters (ViT-hybrid 98,950,952 incl. timm's unused
# 1000-class head, the rest the DPT decoder); the digest is sha256 of the sorted "key:shape" lines.
PUBLISHED_KEYS = 368
PUBLISHED_PARAMETERS = 123_146_985
PUBLISHED_DIGEST = "c49e6991beadcbb8db17cd25ee3ec664f3dd400537e077c35c1b8bd453568f41"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("depth")
    D.write_random_weights(path, seed=0)
    return path


def photo(h=48, w=64, seed=0):
    """A smooth random photo (a few random colours, upscaled) - not noise."""
    import cv2
    small = (np.random.default_rng(seed).random((4, 5, 3)) * 255).astype(np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


# --- the published layout and the conversion ----------------------------------------------------

def test_published_layout_has_the_reference_keys_shapes_and_parameter_count():
    with torch.device("meta"):
        state = D.transformers_to_midas(DPTForDepthEstimation(D.midas_config()).state_dict())
    shapes = {k: tuple(v.shape) for k, v in state.items()} | D.MIDAS_CLASSIFIER
    assert len(shapes) == PUBLISHED_KEYS
    assert sum(math.prod(s) for s in shapes.values()) == PUBLISHED_PARAMETERS
    lines = "\n".join(f"{k}:{s}" for k, s in sorted(shapes.items()))
    assert hashlib.sha256(lines.encode()).hexdigest() == PUBLISHED_DIGEST
    assert shapes["pretrained.model.blocks.11.attn.qkv.weight"] == (2304, 768)
    assert shapes["scratch.refinenet4.resConfUnit1.conv1.weight"] == (256, 256, 3, 3)  # unused, but in the file


def test_random_file_is_the_published_layout(folder):
    state = torch.load(folder / D.MIDAS.file, weights_only=True)
    assert len(state) == PUBLISHED_KEYS and sum(v.numel() for v in state.values()) == PUBLISHED_PARAMETERS


def rename_as_transformers_script(key: str) -> str:
    """The renaming of transformers' convert_dpt_hybrid_to_pytorch.py, restated independently as
    plain substitutions (checks ``depth.midas_names``, which is written as the inverse)."""
    sub = [("pretrained.model.patch_embed.backbone.stem.conv.", "dpt.embeddings.backbone.bit.embedder.convolution."),
           ("pretrained.model.patch_embed.backbone.stem.norm.", "dpt.embeddings.backbone.bit.embedder.norm."),
           ("pretrained.model.patch_embed.backbone.stages.", "dpt.embeddings.backbone.bit.encoder.stages."),
           (".blocks.", ".layers.") if "backbone" in key else ("", ""),
           ("pretrained.model.patch_embed.proj.", "dpt.embeddings.projection."),
           ("pretrained.model.cls_token", "dpt.embeddings.cls_token"),
           ("pretrained.model.pos_embed", "dpt.embeddings.position_embeddings"),
           ("pretrained.model.blocks.", "dpt.encoder.layer."), (".norm1.", ".layernorm_before."),
           (".norm2.", ".layernorm_after."), (".attn.proj.", ".attention.output.dense."),
           (".mlp.fc1.", ".intermediate.dense."), (".mlp.fc2.", ".output.dense."),
           ("pretrained.model.norm.", "dpt.layernorm."), ("scratch.output_conv.", "head.head."),
           ("_rn.", "."), ("scratch.layer", "neck.convs.X"), (".out_conv.", ".projection."),
           (".resConfUnit", ".residual_layer"), (".conv1.", ".convolution1.") if "refinenet" in key else ("", ""),
           (".conv2.", ".convolution2.") if "refinenet" in key else ("", "")]
    for old, new in sub:
        if old and not ("backbone" in key and old in (".norm1.", ".norm2.")):
            key = key.replace(old, new)
    if key.startswith("neck.convs.X"):
        key = f"neck.convs.{int(key[len('neck.convs.X')]) - 1}{key[len('neck.convs.X') + 1:]}"
    if key.startswith("scratch.refinenet"):
        key = f"neck.fusion_stage.layers.{4 - int(key[len('scratch.refinenet')])}{key[len('scratch.refinenet') + 1:]}"
    if key.startswith("pretrained.act_postprocess"):
        n, rest = int(key[len("pretrained.act_postprocess")]) - 1, key[len("pretrained.act_postprocess") + 2:]
        part = {"0.project.0": "readout_projects", "3": "layers", "4": "layers"}[rest.rsplit(".", 1)[0]]
        tail = {"0.project.0": "0", "3": "projection", "4": "resize"}[rest.rsplit(".", 1)[0]]
        key = f"neck.reassemble_stage.{part}.{n}.{tail}.{rest.rsplit('.', 1)[1]}"
    return key


def test_converted_file_equals_the_transformers_model_with_renamed_weights(folder):
    """The .pt (original layout) through our loader holds exactly the tensors of a transformers
    DPT-hybrid loaded strictly with independently renamed weights, and gives its output (the full
    network on a small input; ``test_our_forward_is_transformers_forward`` checks the forward)."""
    weights.clear_cache()
    ours = D.load_midas("depth_midas", str(folder / D.MIDAS.file)).state_dict()
    state = torch.load(folder / D.MIDAS.file, weights_only=True)
    renamed = {}
    for key, value in state.items():
        if key in D.MIDAS_CLASSIFIER:
            continue
        if key.endswith(("attn.qkv.weight", "attn.qkv.bias")):
            layer, kind = key.split(".")[3], key.rsplit(".", 1)[1]
            for name, part in zip(("query", "key", "value"), value.chunk(3)):
                renamed[f"dpt.encoder.layer.{layer}.attention.attention.{name}.{kind}"] = part
        else:
            renamed[rename_as_transformers_script(key)] = value
    with torch.device("meta"):
        reference = DPTForDepthEstimation(D.midas_config())
    reference.load_state_dict(renamed, strict=True, assign=True)
    assert set(ours) == set(reference.state_dict())
    assert all(torch.equal(ours[k].cpu(), v) for k, v in reference.state_dict().items())
    x = D.midas_input([photo(64, 96)])[:, :, :64, :96]  # (1, 3, 64, 96): 4 x 6 patches, cheap
    with torch.inference_mode():
        expected = D.dpt_hybrid_depth(reference.eval(), x)
        got = D.dpt_hybrid_depth(D.load_midas("depth_midas", str(folder / D.MIDAS.file)), x.to(weights.device()))
    assert expected.shape == (1, 64, 96) and expected.max() > 0 and torch.allclose(got.cpu(), expected, atol=1e-6)


def test_our_forward_is_transformers_forward(folder):
    """``dpt_hybrid_depth`` (any size) equals transformers' own forward at its 384 x 384, and runs
    on a non-square input."""
    net = D.load_midas("depth_midas", str(folder / "dpt-hybrid-midas"))
    x = torch.randn(1, 3, 384, 384, generator=torch.Generator().manual_seed(0)).to(weights.device())
    with torch.inference_mode():
        assert torch.allclose(D.dpt_hybrid_depth(net, x), net(pixel_values=x).predicted_depth, atol=1e-6)
        assert D.dpt_hybrid_depth(net, x[:, :, :224, :288]).shape == (1, 224, 288)


# --- pre- and post-processing --------------------------------------------------------------------

def test_midas_input_size_and_normalisation():
    assert D.midas_size(512, 768) == (512, 768) and D.midas_size(64, 64) == (64, 64)  # its own size
    assert D.midas_size(100, 150) == (96, 128)  # sides down to multiples of 32
    assert D.midas_size(1080, 1920) == (768, 1344)  # 1024 x 1024 pixels' worth at most: k = 0.711
    assert D.midas_size(64, 65536) == (32, 32768)  # a strip: 1 M pixels
    red = np.zeros((64, 96, 3), np.uint8)
    red[..., 0] = 255
    x = D.midas_input([red, np.full((64, 96, 3), 127, np.uint8)])
    assert x.shape == (2, 3, 64, 96)
    assert torch.all(x[0, 0] == 1) and torch.all(x[0, 1:] == -1)  # RGB order, x / 127.5 - 1
    assert torch.allclose(x[1], torch.full_like(x[1], 127 / 127.5 - 1))


def test_depth_map_is_normalised_near_white(monkeypatch):
    raw = np.array([[0, 1], [2, 4]], np.float32)  # raw MiDaS: inverse depth, near is large
    monkeypatch.setattr(D, "midas_raw", lambda images, model="", name="": np.stack([raw + 7] * len(images)))
    out = D.depth_midas(np.zeros((2, 2, 3), np.uint8))
    assert out.dtype == np.uint8 and np.array_equal(out[..., 0], [[0, 63], [127, 255]])  # 255 * d, truncated
    assert np.array_equal(out[..., 0], out[..., 2])
    monkeypatch.setattr(D, "midas_raw", lambda images, model="", name="": np.full((len(images), 2, 2), 3, np.float32))
    assert D.depth_midas(np.zeros((2, 2, 3), np.uint8)).max() == 0  # constant depth: black, not NaN


def test_normals_of_a_plane_are_one_colour():
    """depth = c * column: Sobel x = (1 + 2 + 1) * 2c = 8c (kernel [-1 0 1] x [1 2 1]), y = 0; with
    8c = a the normal is (1, 0, 1) / sqrt 2 -> x = z = 127.5 + 127.5 / sqrt 2 = 217.66 -> 217 (truncated);
    RGB = (z, y, x)."""
    c = 2 * math.pi / 8
    ramp = np.tile(np.arange(16, dtype=np.float32) * c, (12, 1))
    n = D.normals_from_depth(ramp, bg_th=0.0, a=2 * math.pi)
    assert n.shape == (12, 16, 3) and n.dtype == np.uint8
    assert np.all(n[:, 1:-1] == [217, 127, 217])
    assert np.all(n[:, 0] == [255, 127, 127])  # reflected border: no slope at the edge columns
    # background: where the normalised depth is under bg_th the normal is flat
    n = D.normals_from_depth(ramp, bg_th=0.5)  # column k is at k / 15 of the depth range
    assert np.all(n[:, :8] == [255, 127, 127]) and np.all(n[:, 8:-1] == [217, 127, 217])
    # a steeper ramp leans further from z
    assert D.normals_from_depth(ramp * 4, 0.0)[5, 5, 2] > 217 > D.normals_from_depth(ramp * 4, 0.0)[5, 5, 0]


def test_normals_of_a_sphere_point_outwards():
    """A sphere in front (inverse depth largest at its centre): at its left the depth rises to the
    right (x > 0: blue over 128), at its right it falls (blue under), at its top it rises downwards
    (y > 0: green over), at its centre the normal faces the viewer (255, 127, 127)."""
    yy, xx = np.mgrid[-32:33, -32:33].astype(np.float32)
    depth = 10 + np.sqrt(np.maximum(30.0 ** 2 - xx ** 2 - yy ** 2, 0))
    n = D.normals_from_depth(depth, bg_th=0.4).astype(int)
    centre, left, right, top, bottom = n[32, 32], n[32, 10], n[32, 54], n[10, 32], n[54, 32]
    assert list(centre) == [255, 127, 127]
    assert left[2] > 160 and right[2] < 96 and abs(left[1] - 127) <= 1 and abs(right[1] - 127) <= 1
    assert top[1] > 160 and bottom[1] < 96 and abs(top[2] - 127) <= 1
    assert left[0] < 250 and top[0] < 250  # tilted: less z
    assert list(n[0, 0]) == [255, 127, 127]  # the background corner (under bg_th)


def test_depth_anything_preprocessing_equals_the_image_processor(folder):
    processor = AutoImageProcessor.from_pretrained(str(folder / "depth-anything-small-hf"), use_fast=False)
    config = json.loads((folder / "depth-anything-small-hf" / "preprocessor_config.json").read_text())
    for shape in [(64, 96), (37, 53), (600, 400), (512, 520)]:
        image = (np.random.default_rng(1).random(shape + (3,)) * 255).astype(np.uint8)
        ours = D.depth_anything_input([image], config)
        theirs = processor(images=image, return_tensors="pt")["pixel_values"]
        assert ours.shape == theirs.shape and torch.allclose(ours, theirs, atol=1e-6)
    # keep the aspect, scale as little as possible towards 518, multiples of 14
    assert D.depth_anything_size(64, 96, config) == (350, 518)
    assert D.depth_anything_size(600, 400, config) == (518, 350)
    assert D.depth_anything_size(512, 520, config) == (504, 518)


# --- weights: refused, missing, found ------------------------------------------------------------

class NotATensor:
    pass


def test_bad_files_are_weights_errors(isolated):
    other = isolated / "other.pt"
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 1, 1)).state_dict(), other)
    with pytest.raises(WeightsError, match=r"other\.pt is not the MiDaS v3 DPT-hybrid.*368 of its 368 weights missing "
                                           r"\(pretrained\.act_postprocess3"):
        D.depth_midas(photo(), model=str(other))
    truncated = isolated / "truncated.pt"
    truncated.write_bytes(other.read_bytes()[:300])
    with pytest.raises(WeightsError, match="truncated"):
        D.depth_midas(photo(), model=str(truncated))
    unsafe = isolated / "unsafe.pt"
    torch.save({"x": NotATensor()}, unsafe)
    with pytest.raises(WeightsError, match="refused"):
        D.normal_midas(photo(), model=str(unsafe))


def test_wrong_folders_are_weights_errors(folder, isolated):
    with pytest.raises(WeightsError, match="depth_anything.*expected MiDaS"):
        D.depth_midas(photo(), model=str(folder / "depth-anything-small-hf"))
    with pytest.raises(WeightsError, match=r"'dpt' model.*expected Depth Anything"):
        D.depth_anything(photo(), model=str(folder / "dpt-hybrid-midas"))
    plain = isolated / "dpt-large"
    DPTForDepthEstimation(DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                                    backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 32, 32],
                                    fusion_hidden_size=16)).save_pretrained(plain)
    with pytest.raises(WeightsError, match="not the hybrid"):
        D.depth_midas(photo(), model=str(plain))
    other_size = isolated / "other-size"
    shutil.copytree(folder / "Depth-Anything-V2-Small-hf", other_size)
    config = json.loads((other_size / "config.json").read_text())
    (other_size / "config.json").write_text(json.dumps(config | {"fusion_hidden_size": 24}))
    with pytest.raises(WeightsError, match="other-size"):
        D.depth_anything_v2(photo(), model=str(other_size))


def test_missing_weights_name_the_places_searched(isolated):
    for name in ("depth_midas", "normal_midas"):
        with pytest.raises(WeightsNotFound) as e:
            get_annotator(name)(photo())
        message = str(e.value)
        assert "dpt_hybrid-midas-501f0c75.pt" in message and str(isolated / "ann") in message
        assert "models--lllyasviel--Annotators" in message and "Intel/dpt-hybrid-midas" in message
    with pytest.raises(WeightsNotFound, match="models--depth-anything--Depth-Anything-V2-Large-hf"):
        get_annotator("depth_anything_v2")(photo())
    assert "depth-anything-large-hf" in unavailable("depth_anything")


def test_found_in_the_annotator_folder_and_the_hub_cache(folder, isolated, monkeypatch):
    monkeypatch.setenv("CTRLNET_ANNOTATORS", str(folder))
    assert all(unavailable(n) == "" for n in D.ANNOTATORS)
    assert weights.find("depth_midas", D.MIDAS) == folder / D.MIDAS.file
    # the .pt in the hub cache layout (find does not read it), Depth Anything V2 as a snapshot folder
    monkeypatch.setenv("CTRLNET_ANNOTATORS", str(isolated / "ann"))
    for repo, name in (("lllyasviel/Annotators", D.MIDAS.file), ("depth-anything/Depth-Anything-V2-Small-hf", "")):
        root = isolated / "hub" / ("models--" + repo.replace("/", "--"))
        (root / "refs").mkdir(parents=True)
        (root / "refs" / "main").write_text("abc123")
        if name:
            (root / "snapshots" / "abc123").mkdir(parents=True)
            (root / "snapshots" / "abc123" / name).write_bytes(b"placeholder")
        else:
            shutil.copytree(folder / "Depth-Anything-V2-Small-hf", root / "snapshots" / "abc123")
    assert unavailable("depth_midas") == "" and weights.locate(D.MIDAS).parent.name == "abc123"
    out = get_annotator("depth_anything_v2")(photo())
    assert out.shape == (48, 64, 3) and out.max() > out.min()
    # only the Intel/dpt-hybrid-midas folder (no .pt anywhere): depth_midas runs on it
    shutil.rmtree(isolated / "hub" / "models--lllyasviel--Annotators")
    assert "Intel/dpt-hybrid-midas" in unavailable("depth_midas")  # named as an alternative
    shutil.copytree(folder / "dpt-hybrid-midas", isolated / "ann" / "dpt-hybrid-midas")
    assert unavailable("depth_midas") == ""  # the folder alone makes it available
    assert get_annotator("depth_midas")(photo()).shape == (48, 64, 3)
    # a checkout of lllyasviel/ControlNet keeps the .pt in annotator/ckpts/
    shutil.rmtree(isolated / "ann" / "dpt-hybrid-midas")
    ckpts = isolated / "ControlNet" / "annotator" / "ckpts"
    ckpts.mkdir(parents=True)
    shutil.copyfile(folder / D.MIDAS.file, ckpts / D.MIDAS.file)
    monkeypatch.setenv("CTRLNET_ANNOTATORS", str(isolated / "ControlNet"))
    assert D._midas_path("depth_midas", "") == ckpts / D.MIDAS.file


# --- end to end, batch == single -----------------------------------------------------------------

def test_batch_equals_single(folder):
    """One forward pass for several images gives each image's own map: the float prediction to
    float tolerance (a batch changes the CPU kernels' blocking: about 1e-6 relative, measured), so a
    depth map to 1 level, a normal map but for the odd pixel (Sobel and the background threshold
    amplify the last bits)."""
    models = {"depth_midas": "dpt-hybrid-midas", "normal_midas": "dpt-hybrid-midas",
              "depth_anything": "depth-anything-small-hf", "depth_anything_v2": "Depth-Anything-V2-Small-hf"}
    images = [photo(seed=s) for s in range(2)]
    for name, sub in models.items():
        annotate = get_annotator(name, model=str(folder / sub))  # end to end through the registry
        singles = [annotate(i) for i in images]
        assert all(s.shape == (48, 64, 3) and s.dtype == np.uint8 and s.max() > s.min() for s in singles)
        assert not np.array_equal(*singles)
        together = annotate(images)
        for a, b in zip(together, singles):
            assert (a == b).mean() > 0.99, name
            assert name == "normal_midas" or np.abs(a.astype(int) - b).max() <= 1, name
    raw = D.midas_raw(images, str(folder / "dpt-hybrid-midas"))
    single = D.midas_raw(images[:1], str(folder / "dpt-hybrid-midas"))[0]
    assert np.allclose(raw[0], single, rtol=1e-5, atol=1e-5 * single.max())
    flat = get_annotator("normal_midas", model=str(folder / "dpt-hybrid-midas"), bg_th=1.0)(images[0])
    assert np.all(flat == [255, 127, 127], axis=2).mean() > 0.99  # all under the threshold but the nearest pixel

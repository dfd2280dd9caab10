"""ADE20K segmentation (``ctrlnet.annotators.ade20k``): the palette, class maps to colours and back,
and the three transformers segmenters from tiny random folders (the layout ``write_random_weights``
writes is the published one: config, weights, preprocessor config, OneFormer's CLIP BPE)."""

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (CLIPTokenizer, DPTConfig, OneFormerProcessor, SegformerForSemanticSegmentation,
                          UperNetForSemanticSegmentation)
from transformers.models.oneformer import modeling_oneformer
from transformers.models.oneformer.image_processing_pil_oneformer import OneFormerImageProcessorPil
from transformers.models.segformer.image_processing_pil_segformer import SegformerImageProcessorPil

from ctrlnet.annotators import BATCH, PARAMS, WEIGHTS, ade20k, get_annotator, weights
from ctrlnet.annotators.segmentation import ADE20K_PALETTE as FIRST_16
from ctrlnet.annotators.weights import WeightsError, WeightsNotFound
from ctrlnet.base import shipped_tokenizer

NAMES = ("seg_ofade20k", "seg_upernet_ade20k", "seg_segformer_ade20k")
FOLDERS = {"seg_ofade20k": "oneformer_ade20k_swin_tiny", "seg_upernet_ade20k": "upernet-convnext-small",
           "seg_segformer_ade20k": "segformer-b0-finetuned-ade-512-512"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("ade20k")
    ade20k.write_random_weights(root, seed=0)
    return root


@pytest.fixture
def env(tiny, tmp_path, monkeypatch):
    """Only ``tiny`` is searched; the real home and hub cache never are."""
    monkeypatch.setenv("CTRLNET_ANNOTATORS", str(tiny))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tiny


def photo(h=64, w=96, seed=0):
    """A smooth random picture (regions a segmenter can split)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3)).astype(np.float32)
    big = torch.nn.functional.interpolate(torch.from_numpy(small).permute(2, 0, 1)[None], size=(h, w),
                                          mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    return big.round().clamp(0, 255).numpy().astype(np.uint8)


# --- palette and class maps ------------------------------------------------------------------

def test_palette_is_the_seg_controlnets():
    """mmseg's ADE20KDataset: 150 classes and colours; the weight-free module's first 16 agree."""
    assert len(ade20k.ADE20K_CLASSES) == len(ade20k.ADE20K_PALETTE) == 150
    assert ade20k.ADE20K_CLASSES[:3] == ("wall", "building", "sky") and ade20k.ADE20K_CLASSES[-1] == "flag"
    assert ade20k.ADE20K_PALETTE[:3].tolist() == [[120, 120, 120], [180, 120, 120], [6, 230, 230]]
    assert ade20k.ADE20K_PALETTE[-1].tolist() == [92, 0, 255] and ade20k.ADE20K_CLASSES[149] == "flag"
    assert np.array_equal(ade20k.ADE20K_PALETTE[:16], FIRST_16)
    colours, counts = np.unique(ade20k.ADE20K_PALETTE, axis=0, return_counts=True)
    assert colours[counts > 1].tolist() == [[140, 140, 140]]  # road and skyscraper, as published
    assert ade20k.ADE20K_PALETTE.dtype == np.uint8


def test_class_map_to_colours_and_back():
    ids = np.array([[0, 2, 12], [149, 48, -1], [6, 7, 200]])
    seg = ade20k.colourise(ids)
    assert seg.dtype == np.uint8 and seg.shape == (3, 3, 3)
    assert seg[0, 1].tolist() == [6, 230, 230] and seg[0, 2].tolist() == [150, 5, 61]  # sky, person
    assert seg[1, 2].tolist() == [0, 0, 0] and seg[2, 2].tolist() == [0, 0, 0]  # unknown ids
    back = ade20k.classes_of(seg)
    # skyscraper (48) shares road's colour and reads as road (6); unknown ids come back as -1
    assert back.tolist() == [[0, 2, 12], [149, 6, -1], [6, 7, -1]]
    # every class survives the round trip (but skyscraper)
    all_ids = np.arange(150).reshape(10, 15)
    assert np.array_equal(ade20k.classes_of(ade20k.colourise(all_ids)), np.where(all_ids == 48, 6, all_ids))


def test_classes_of_takes_the_nearest_colour_within_a_distance():
    seg = ade20k.colourise(np.array([[0, 2], [9, 98]]))
    noisy = seg.astype(int) + np.array([[[3, -3, 2], [-4, 4, 0]], [[1, 1, 1], [0, -2, 1]]])
    assert ade20k.classes_of(noisy.clip(0, 255).astype(np.uint8)).tolist() == [[0, 2], [9, 98]]
    far = np.array([[[128, 0, 0], [60, 60, 200]]], np.uint8)  # far from every class
    assert ade20k.classes_of(far).tolist() == [[-1, -1]]
    assert ade20k.classes_of(far, max_distance=200).min() >= 0
    with pytest.raises(ValueError, match="integers"):
        ade20k.colourise(np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        ade20k.classes_of(np.zeros((4, 4), np.uint8))


# --- pre / post-processing -------------------------------------------------------------------

def test_upsampled_argmax_equals_the_processors(monkeypatch):
    """SegformerImageProcessor.post_process_semantic_segmentation, also when done a few classes at a time."""
    logits = torch.randn(2, 150, 16, 16, generator=torch.Generator().manual_seed(0))
    expected = SegformerImageProcessorPil().post_process_semantic_segmentation(
        SimpleNamespace(logits=logits), target_sizes=[(50, 70)] * 2)
    assert torch.equal(ade20k.upsampled_argmax(logits, 50, 70), torch.stack(expected))
    monkeypatch.setattr(ade20k, "CHUNK_BYTES", 4 * 2 * 50 * 70 * 7)  # 7 classes per step
    assert torch.equal(ade20k.upsampled_argmax(logits, 50, 70), torch.stack(expected))


def test_oneformer_scores_equal_the_processors():
    g = torch.Generator().manual_seed(1)
    out = SimpleNamespace(class_queries_logits=3 * torch.randn(2, 12, 151, generator=g),
                          masks_queries_logits=3 * torch.randn(2, 12, 20, 30, generator=g))
    expected = OneFormerImageProcessorPil().post_process_semantic_segmentation(out, target_sizes=[(45, 61)] * 2)
    ours = ade20k.upsampled_argmax(ade20k.oneformer_scores(out.class_queries_logits, out.masks_queries_logits),
                                   45, 61)
    assert torch.equal(ours, torch.stack(expected)) and len(torch.unique(ours)) > 5


def test_task_tokens_are_the_processors():
    """"the task is semantic" as OneFormerProcessor encodes it (CLIP BPE ids, padding zeroed)."""
    tokens = ade20k.task_tokens(shipped_tokenizer(), 77)
    processor = OneFormerProcessor(image_processor=OneFormerImageProcessorPil(), tokenizer=shipped_tokenizer())
    expected = processor(images=[photo()], task_inputs=["semantic"], return_tensors="pt")["task_inputs"]
    assert torch.equal(tokens, expected.float())
    # <|startoftext|> the task is seman tic <|endoftext|>, then zeros
    assert tokens[0, :8].tolist() == [49406, 518, 10549, 533, 29119, 1550, 49407, 0] and tokens[0, 7:].eq(0).all()


# --- the segmenters --------------------------------------------------------------------------

def test_registered():
    for name in NAMES:
        assert name in BATCH and set(PARAMS[name]) == {"model"}
        assert WEIGHTS[name][0].folder and WEIGHTS[name][0].repos[0].endswith(FOLDERS[name])


@pytest.mark.parametrize("name", NAMES)
def test_found_in_the_annotators_folder_and_paints_only_palette_colours(name, env):
    weights.clear_cache()
    image, other = photo(64, 64), photo(64, 64, seed=1)  # square: OneFormer runs at 512 x 512
    out = get_annotator(name)(image)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert (ade20k.classes_of(out, max_distance=0) >= 0).all()  # every pixel exactly a class colour
    out_other = get_annotator(name, model=str(env / FOLDERS[name]))(other)  # the folder given
    # batch == single
    many = get_annotator(name)([image, other])
    assert np.array_equal(many[0], out) and np.array_equal(many[1], out_other)


@pytest.mark.parametrize("name, cls", [("seg_segformer_ade20k", SegformerForSemanticSegmentation),
                                       ("seg_upernet_ade20k", UperNetForSemanticSegmentation)])
def test_equal_to_the_model_with_its_processor(name, cls, env):
    """The transformers model's forward (auxiliary head included) + the processor's post-processing."""
    images = [photo(60, 90, seed=s) for s in range(2)]
    processor = SegformerImageProcessorPil.from_pretrained(env / FOLDERS[name])
    model = cls.from_pretrained(env / FOLDERS[name]).eval()
    with torch.no_grad():
        out = model(**processor(images=images, return_tensors="pt"))
    expected = processor.post_process_semantic_segmentation(out, target_sizes=[(60, 90)] * 2)
    ours = ade20k.segment_batch(name, images)
    assert all(np.array_equal(a, b.numpy()) for a, b in zip(ours, expected))
    assert len(np.unique(ours[0])) > 2


def test_oneformer_equal_to_the_transformers_head_with_its_processor(env, monkeypatch):
    """OneFormerForUniversalSegmentation + OneFormerProcessor (its loss wants scipy only to be built)."""
    monkeypatch.setattr(modeling_oneformer, "requires_backends", lambda *a, **k: None)
    folder = env / FOLDERS["seg_ofade20k"]
    model = modeling_oneformer.OneFormerForUniversalSegmentation.from_pretrained(folder).eval()
    net = ade20k.load("seg_ofade20k")
    assert net.processor.size.shortest_edge == 512 and net.processor.size.longest_edge == 2048
    processor = OneFormerProcessor(image_processor=net.processor, tokenizer=CLIPTokenizer.from_pretrained(folder))
    image = photo(48, 80)
    inputs = processor(images=[image], task_inputs=["semantic"], return_tensors="pt")
    assert inputs["pixel_values"].shape[2:] == (512, 853)  # short side 512
    with torch.no_grad():
        expected = processor.post_process_semantic_segmentation(model(**inputs), target_sizes=[(48, 80)])
    assert np.array_equal(ade20k.segment_batch("seg_ofade20k", [image])[0], expected[0].numpy())


def test_oneformer_without_tokenizer_files_uses_the_shipped_bpe(env, tmp_path):
    folder = tmp_path / "of"
    shutil.copytree(env / FOLDERS["seg_ofade20k"], folder)
    (folder / "vocab.json").unlink()
    (folder / "merges.txt").unlink()
    image = photo(64, 64)
    assert np.array_equal(ade20k.ANNOTATORS["seg_ofade20k"](image, model=str(folder)),
                          ade20k.ANNOTATORS["seg_ofade20k"](image))


def test_found_in_the_hub_cache(tiny, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("CTRLNET_ANNOTATORS", str(empty))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    repo = hub / "models--nvidia--segformer-b0-finetuned-ade-512-512"
    shutil.copytree(tiny / FOLDERS["seg_segformer_ade20k"], repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    assert weights.find("seg_segformer_ade20k", ade20k.SEGFORMER) == repo / "snapshots" / "abc123"
    assert get_annotator("seg_segformer_ade20k")(photo()).shape == (64, 96, 3)


def test_missing_names_the_places_searched(tmp_path, monkeypatch):
    monkeypatch.setenv("CTRLNET_ANNOTATORS", str(tmp_path / "ann"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(WeightsNotFound) as e:
        get_annotator("seg_upernet_ade20k")(photo())
    message = str(e.value)
    assert str(tmp_path / "ann") in message and "models--openmmlab--upernet-convnext-small" in message
    assert "https://huggingface.co/openmmlab/upernet-convnext-small" in message


def test_wrong_architecture_is_refused(env, tmp_path):
    dpt = tmp_path / "dpt"
    DPTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=1, intermediate_size=16).save_pretrained(dpt)
    for name in NAMES:
        with pytest.raises(WeightsError, match=f"{dpt}.*'dpt'.*expected"):
            ade20k.ANNOTATORS[name](photo(), model=str(dpt))
    with pytest.raises(WeightsError, match="upernet"):  # a SegFormer folder is not a UperNet one
        ade20k.ANNOTATORS["seg_upernet_ade20k"](photo(), model=str(env / FOLDERS["seg_segformer_ade20k"]))


@pytest.mark.parametrize("labels", [
    {str(i): n for i, n in enumerate(["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
                                      "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
                                      "truck", "bus", "train", "motorcycle", "bicycle"])},  # Cityscapes
    {str(i): f"LABEL_{i}" for i in range(150)},  # 150 classes, not ADE20K's
])
def test_other_label_sets_are_refused(labels, env, tmp_path):
    folder = tmp_path / "seg"
    shutil.copytree(env / FOLDERS["seg_segformer_ade20k"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["id2label"], config["label2id"] = labels, {n: int(i) for i, n in labels.items()}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=f"{folder} predicts {len(labels)} classes.*not ADE20K's 150"):
        ade20k.ANNOTATORS["seg_segformer_ade20k"](photo(), model=str(folder))


def test_oneformer_spellings_of_the_classes_are_accepted():
    """OneFormer's ADE20K names (``ADE20K_150_CATEGORIES``) differ in places: "road, route", "tub", ..."""
    theirs = list(ade20k.ADE20K_CLASSES)
    theirs[6], theirs[8], theirs[37], theirs[89], theirs[138] = "road, route", "window ", "tub", "tv", "trash can"
    ade20k.check_labels({"id2label": dict(enumerate(theirs))}, "f", "x", "y")


def test_broken_weights_are_refused(env, tmp_path):
    folder = tmp_path / "seg"
    shutil.copytree(env / FOLDERS["seg_segformer_ade20k"], folder)
    file = folder / "model.safetensors"
    state = load_file(file)
    del state[sorted(state)[0]]
    save_file(state, file, metadata={"format": "pt"})
    with pytest.raises(WeightsError, match=f"{folder} is not SegFormer.*1 weights missing"):
        ade20k.ANNOTATORS["seg_segformer_ade20k"](photo(), model=str(folder))
    file.write_bytes(file.read_bytes()[:1000])  # truncated
    weights.clear_cache()
    with pytest.raises(WeightsError, match=f"{folder} could not be loaded"):
        ade20k.ANNOTATORS["seg_segformer_ade20k"](photo(), model=str(folder))
    (folder / "preprocessor_config.json").unlink()
    shutil.copyfile(env / FOLDERS["seg_segformer_ade20k"] / "model.safetensors", file)
    with pytest.raises(WeightsError, match="no preprocessor_config.json"):
        ade20k.ANNOTATORS["seg_segformer_ade20k"](photo(), model=str(folder))


def test_batch_of_mixed_sizes_is_refused(env):
    with pytest.raises(ValueError, match="one size"):
        BATCH["seg_segformer_ade20k"]([photo(), photo(64, 64)])

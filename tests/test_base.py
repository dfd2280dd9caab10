"""Loading a locked base offline: diffusers folders and single-file checkpoints."""

import json

import pytest
import torch
from safetensors.torch import save_file

from ctrlnet.base import BaseLoadError, check_tokenizer, detect_single_file_kind, load_base, load_tokenizer
from ctrlnet.models import ControlNet
from ctrlnet.testbed.tiny import write_byte_tokenizer, write_tiny_base
from helpers import sd15_single_file, single_file


@pytest.fixture(scope="module")
def tiny_bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {f: write_tiny_base(root / f, f, seed=0) for f in ("sd15", "sd21", "sdxl")}


@pytest.mark.parametrize("family", ["sd15", "sd21", "sdxl"])
def test_diffusers_folder_loads_locked(tiny_bases, family):
    base = load_base(tiny_bases[family])
    for part in base.parts().values():
        assert not part.training and not any(p.requires_grad for p in part.parameters())
    assert base.prediction_type == ("v_prediction" if family == "sd21" else "epsilon")
    assert (base.text_encoder_2 is not None) == (family == "sdxl")
    assert base.vae_scale_factor == 8
    ids = base.tokenizer("a red circle").input_ids
    assert ids[0] == 512 and ids[-1] == 513 and len(ids) == len("a red circle") - 2 + 2
    ControlNet.from_unet(base.unet)  # every family gives a ControlNet


def test_diffusers_own_pipeline_loads_the_same_folder(tiny_bases):
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(tiny_bases["sd15"], safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True)
    base = load_base(tiny_bases["sd15"])
    assert all(torch.equal(a, b) for a, b in zip(pipe.unet.state_dict().values(), base.unet.state_dict().values()))


def test_empty_or_missing_tokenizer_is_an_error(tmp_path, tiny_bases):
    from transformers import CLIPTokenizer
    (tmp_path / "tok").mkdir()
    with pytest.raises(BaseLoadError, match="vocab.json"):
        load_tokenizer(tmp_path / "tok")
    # What an offline CLIPTokenizer silently gives without its files: a vocabulary of 2.
    vocab = tmp_path / "v"
    vocab.mkdir()
    (vocab / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1}))
    (vocab / "merges.txt").write_text("#version: 0.2\n")
    empty = CLIPTokenizer(str(vocab / "vocab.json"), str(vocab / "merges.txt"))
    with pytest.raises(BaseLoadError, match="EMPTY"):
        check_tokenizer(empty, "somewhere")
    assert len(check_tokenizer(load_tokenizer(write_byte_tokenizer(tmp_path / "ok")), "ok")) == 514


def test_missing_parts_and_paths(tmp_path):
    with pytest.raises(BaseLoadError, match="no such base"):
        load_base(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BaseLoadError, match="model_index.json"):
        load_base(tmp_path / "empty")


@pytest.mark.parametrize("family", ["sd15", "sd21", "sdxl"])
def test_single_file_checkpoint_equals_the_folder(tmp_path, tiny_bases, family):
    folder = load_base(tiny_bases[family])
    sd = single_file(folder)
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "tiny.safetensors")
    assert detect_single_file_kind(sd) == family
    single = load_base(tmp_path / "tiny.safetensors", config_dir=tiny_bases[family])
    assert single.prediction_type == folder.prediction_type
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(folder, name) is None:
            assert getattr(single, name) is None
            continue
        a, b = getattr(folder, name).state_dict(), getattr(single, name).state_dict()
        assert set(a) - {k for k in a if k.endswith("position_ids")} <= set(b), name
        assert all(torch.equal(a[k], b[k]) for k in a if k in b), name
    assert not any(p.requires_grad for p in single.unet.parameters())
    # The same file with a bad UNet part is refused with the key named.
    del sd["model.diffusion_model.out.2.weight"]
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "broken.safetensors")
    with pytest.raises(BaseLoadError, match="out.2.weight"):
        load_base(tmp_path / "broken.safetensors", config_dir=tiny_bases[family])


def test_single_file_tokenizer_that_does_not_fit_says_what_to_pass(tmp_path, tiny_bases):
    """Without a tokenizer folder the shipped CLIP tokenizer is used; a text encoder with another
    vocabulary (the tiny bases embed 514 byte tokens) is refused at load time, not at the first prompt."""
    import shutil
    cfg = tmp_path / "cfg"
    shutil.copytree(tiny_bases["sd15"], cfg)
    shutil.rmtree(cfg / "tokenizer")
    sd = sd15_single_file(load_base(tiny_bases["sd15"]))
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "m.safetensors")
    with pytest.raises(BaseLoadError, match=r"49408 tokens but the text encoder embeds 514.*tokenizer=DIR"):
        load_base(tmp_path / "m.safetensors", config_dir=cfg)
    with pytest.raises(BaseLoadError, match="no such tokenizer folder"):
        load_base(tmp_path / "m.safetensors", config_dir=cfg, tokenizer=tmp_path / "nope")
    base = load_base(tmp_path / "m.safetensors", config_dir=cfg, tokenizer=tiny_bases["sd15"] / "tokenizer")
    assert len(base.tokenizer) == 514


def test_shipped_configs_build_the_real_architectures():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig
    from ctrlnet.configs import CONFIGS_DIR
    with torch.device("meta"):
        for kind, unet_params in (("sd15", 859_520_964), ("sd21", 865_910_724), ("sdxl", 2_567_463_684)):
            cfg = json.loads((CONFIGS_DIR / kind / "unet" / "config.json").read_text())
            unet = UNet2DConditionModel.from_config(cfg)
            assert sum(p.numel() for p in unet.parameters()) == unet_params, kind
            vae = AutoencoderKL.from_config(json.loads((CONFIGS_DIR / kind / "vae" / "config.json").read_text()))
            assert sum(p.numel() for p in vae.parameters()) == 83_653_863, kind
            CLIPTextConfig.from_dict(json.loads((CONFIGS_DIR / kind / "text_encoder" / "config.json").read_text()))

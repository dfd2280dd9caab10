"""The CLIP tokenizer ctrlnet ships for single-file checkpoints, against OpenAI's own tokenizer.

``tests/data/clip_reference_ids.json`` holds the ids OpenAI's ``SimpleTokenizer`` gives for the
prompts in ``tests/data/clip_prompts.txt`` (made by ``scripts/build_clip_tokenizer.py
--reference-ids``); SD 1.x pads them with ``<|endoftext|>`` (transformers' CLIPTokenizer as the
original repo used it), SD 2.x / SDXL's second encoder with 0 (``open_clip.tokenize``).
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ctrlnet.base import load_base, load_tokenizer, shipped_tokenizer
from ctrlnet.pipeline.text import tokenize
from ctrlnet.testbed.tiny import write_tiny_base
from helpers import single_file

DATA = Path(__file__).parent / "data"
REFERENCE = json.loads((DATA / "clip_reference_ids.json").read_text(encoding="utf-8"))["ids"]
SOT, EOT = 49406, 49407


def padded(ids: list[int], pad: int) -> list[int]:
    return ids + [pad] * (77 - len(ids))


def test_fixture_covers_the_prompts_and_long_ones_truncate():
    prompts = [p for p in (DATA / "clip_prompts.txt").read_text(encoding="utf-8").split("\n") if p.strip()]
    assert sorted(prompts) == sorted(REFERENCE)
    assert REFERENCE["a photo of a cat"] == [SOT, 320, 1125, 539, 320, 2368, EOT]  # the ids every CLIP user knows
    assert max(len(v) for v in REFERENCE.values()) == 77  # a prompt beyond the context is in the set


@pytest.mark.parametrize("padding, pad_id", [("eot", EOT), ("zero", 0)])
def test_shipped_tokenizer_gives_openai_ids(padding, pad_id):
    tok = shipped_tokenizer(padding)
    assert len(tok) == 49408 and tok.model_max_length == 77 and tok.pad_token_id == pad_id
    prompts = list(REFERENCE)
    ours = tokenize(tok, prompts).tolist()  # what the pipeline feeds the text encoder
    for p, row in zip(prompts, ours):
        assert row == padded(REFERENCE[p], pad_id), p


@pytest.mark.parametrize("padding, pad_id", [("eot", EOT), ("zero", 0)])
def test_text_encoder_output_matches_the_reference_ids(padding, pad_id):
    torch.manual_seed(0)
    enc = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                       num_hidden_layers=2, max_position_embeddings=77, eos_token_id=EOT)).eval()
    prompts = list(REFERENCE)
    ref = torch.tensor([padded(REFERENCE[p], pad_id) for p in prompts])
    with torch.no_grad():
        ours = enc(tokenize(shipped_tokenizer(padding), prompts)).last_hidden_state
        theirs = enc(ref).last_hidden_state
    assert torch.equal(ours, theirs)


def test_folder_with_only_tokenizer_json_loads(tmp_path):
    tok = shipped_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / "tok" / name).unlink(missing_ok=True)
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    loaded = load_tokenizer(tmp_path / "tok")
    prompts = list(REFERENCE)
    assert torch.equal(tokenize(loaded, prompts), tokenize(tok, prompts))


def real_vocab_single_file(tmp_path: Path, family: str) -> tuple[Path, Path]:
    """A tiny single file whose text encoder(s) embed CLIP's 49 408 tokens, and a config folder
    without a tokenizer (what a user with only the .safetensors file has)."""
    folder = write_tiny_base(tmp_path / "base", family)
    base = load_base(folder)
    torch.manual_seed(1)
    cfg = dict(vocab_size=49408, hidden_size=12, intermediate_size=24, num_attention_heads=2, num_hidden_layers=2,
               max_position_embeddings=77, projection_dim=8, eos_token_id=EOT)
    base.text_encoder = CLIPTextModel(CLIPTextConfig(**cfg))
    if family == "sdxl":
        base.text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**dict(cfg, hidden_size=8, intermediate_size=16)))
    config_dir = tmp_path / "cfg"
    shutil.copytree(folder, config_dir)
    for part in ("tokenizer", "tokenizer_2"):
        shutil.rmtree(config_dir / part, ignore_errors=True)
    for part in ("text_encoder", "text_encoder_2"):
        if getattr(base, part) is not None:
            getattr(base, part).config.to_json_file(config_dir / part / "config.json")
    path = tmp_path / f"{family}.safetensors"
    save_file({k: v.contiguous() for k, v in single_file(base).items()}, path)
    return path, config_dir


@pytest.mark.parametrize("family, pads", [("sd15", (EOT, None)), ("sd21", (0, None)), ("sdxl", (EOT, 0))])
def test_single_file_needs_no_tokenizer_argument(tmp_path, family, pads):
    path, config_dir = real_vocab_single_file(tmp_path, family)
    base = load_base(path, config_dir=config_dir)
    assert base.tokenizer.pad_token_id == pads[0]
    assert (base.tokenizer_2.pad_token_id if base.tokenizer_2 is not None else None) == pads[1]
    assert not any(p.is_meta for part in base.parts().values() for p in part.parameters())
    ids = tokenize(base.tokenizer, ["a photo of a cat"])
    assert ids[0, :7].tolist() == REFERENCE["a photo of a cat"]
    with torch.no_grad():
        assert torch.isfinite(base.text_encoder(ids).last_hidden_state).all()


def test_cli_generate_with_a_single_file_and_no_tokenizer(tmp_path, monkeypatch, capsys):
    """`ctrlnet generate --base model.safetensors`, nothing else: the A1111 / ComfyUI user's case.
    The shipped SD configs are swapped for the tiny architecture's (a real SD1.5 is 4 GB); the
    tokenizer is the shipped one."""
    import ctrlnet.base
    from ctrlnet import cli
    path, config_dir = real_vocab_single_file(tmp_path, "sd15")
    configs = tmp_path / "configs"
    configs.mkdir()
    shutil.copytree(config_dir, configs / "sd15")
    monkeypatch.setattr(ctrlnet.base, "CONFIGS_DIR", configs)
    monkeypatch.setattr(cli, "retain_freed_memory", lambda: None)
    out = tmp_path / "out.png"
    cli.main(["generate", "--base", str(path), "--prompt", "a photo of a cat", "--steps", "1", "--width", "64",
              "--height", "64", "--out", str(out)])
    assert out.is_file()
    capsys.readouterr()
    code = cli.main(["generate", "--base", str(path), "--tokenizer", str(tmp_path / "nope"), "--prompt", "x",
                     "--steps", "1", "--out", str(out)])
    assert code != 0 and "nope: no such tokenizer folder" in capsys.readouterr().err

"""The nano SD's tokenizer and trainer: one token per word, exact resume of both stages."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ctrlnet.testbed import nano
from ctrlnet.testbed.shapes import generate


def test_every_shapesworld_word_is_one_token(tmp_path):
    tok = nano.load_tokenizer(nano.write_word_tokenizer(tmp_path / "tok"))
    for word in nano.WORDS:
        assert len(tok(word).input_ids) == 3, word  # <start> word <end>
    ids = tok("a light gray triangle, an orange square and a yellow circle on a black background").input_ids
    assert len(ids) == 18 and tok.model_max_length == nano.MAX_LENGTH
    assert len(tok("unknown words still encode").input_ids) > 5  # letter by letter


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("d") / "shapes", 16, seed=0, size=128, workers=1, progress=False)


def weights(path):
    return load_file(path / "state.safetensors")


def test_vae_and_sd_stages_resume_exactly(tmp_path, data):
    straight, split = tmp_path / "straight", tmp_path / "split"
    nano.train_vae(data, straight, minutes=10, batch=2, max_steps=4, limit=16)
    nano.train_vae(data, split, minutes=10, batch=2, max_steps=2, limit=16)
    nano.train_vae(data, split, minutes=10, batch=2, max_steps=4, limit=16)  # resumes at step 2
    a, b = weights(straight / "vae"), weights(split / "vae")
    assert json.loads((split / "vae" / "state.json").read_text())["step"] == 4
    assert all(torch.equal(a[k], b[k]) for k in a)

    nano.train_sd(data, straight, minutes=10, batch=4, max_steps=3, limit=16)
    nano.train_sd(data, split, minutes=10, batch=4, max_steps=1, limit=16)
    nano.train_sd(data, split, minutes=10, batch=4, max_steps=3, limit=16)
    a, b = weights(straight / "sd"), weights(split / "sd")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["ema_unet.conv_in.weight"], a["unet.conv_in.weight"])

    # Decoder-only fine-tuning leaves the encoder (so the latents) untouched.
    before = weights(straight / "vae")
    nano.train_decoder(data, straight, minutes=10, batch=2, max_steps=2, limit=16)
    after = weights(straight / "decoder")
    assert all(torch.equal(before[k], after[k]) for k in after if k.startswith(("vae.encoder.", "vae.quant_conv.")))
    assert not torch.equal(before["vae.decoder.conv_out.weight"], after["vae.decoder.conv_out.weight"])

    # The second pass (whole images) starts from the first and resumes (the decoder passes' cosine LR
    # follows wall time, so equal up to float noise, not bit for bit).
    first = weights(straight / "decoder")
    nano.train_decoder(data, straight, minutes=10, batch=2, crop=128, max_steps=2, limit=16, name="decoder2")
    nano.train_decoder(data, split, minutes=10, batch=2, max_steps=2, limit=16)
    nano.train_decoder(data, split, minutes=10, batch=2, crop=128, max_steps=1, limit=16, name="decoder2")
    nano.train_decoder(data, split, minutes=10, batch=2, crop=128, max_steps=2, limit=16, name="decoder2")
    d2, d2_split = weights(straight / "decoder2"), weights(split / "decoder2")
    assert json.loads((split / "decoder2" / "state.json").read_text())["step"] == 2
    assert all(torch.allclose(d2[k], d2_split[k], rtol=1e-4, atol=1e-6) for k in d2)
    assert not torch.equal(first["vae.decoder.conv_out.weight"], d2["vae.decoder.conv_out.weight"])
    vae = nano.load_trained_vae(straight)
    assert torch.equal(vae.decoder.conv_out.weight, d2["vae.decoder.conv_out.weight"])
    with pytest.raises(ValueError, match="decoder pass"):
        nano.train_decoder(data, straight, minutes=1, name="decoder3")

    out = nano.export(straight, tmp_path / "nano-sd")
    record = json.loads((out / "TRAINING.json").read_text())
    assert "decoder" in record and record["decoder2"]["steps"] == 2
    assert any("--name decoder2" in c and "--crop 128" in c for c in record["commands"])
    from ctrlnet.base import load_base
    base = load_base(out)
    assert base.prediction_type == "v_prediction" and base.scheduler.config.rescale_betas_zero_snr
    assert torch.equal(base.unet.conv_in.weight, a["ema_unet.conv_in.weight"])

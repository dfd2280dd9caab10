"""The nano SD's tokenizer and trainer: one token per word; every stage resumes bit for bit, and a
time budget stops a stage without changing any step (no test depends on the machine's speed)."""

import json
import shlex

import pytest
import torch

from ctrlnet.formats.checkpoint import latest_checkpoint, read_checkpoint
from ctrlnet.testbed import NANO_SD, nano
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


def checkpoint(run, stage):
    """(tensors, state) of the stage's latest checkpoint."""
    return read_checkpoint(latest_checkpoint(run / stage))


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def logged_steps(run, stage):
    return [json.loads(l)["step"] for l in (run / f"{stage}.log.jsonl").read_text().splitlines()]


def test_a_time_budget_stops_a_stage_without_changing_it(tmp_path, data):
    # minutes=0 is checked after each step: every call stops after exactly one step, on any machine.
    straight, split = tmp_path / "straight", tmp_path / "split"
    nano.train_vae(data, straight, steps=3, batch=2, limit=16)
    for step in (1, 2):
        assert nano.train_vae(data, split, steps=3, batch=2, limit=16, minutes=0).name == f"step-{step:06d}"
    assert nano.train_vae(data, split, steps=3, batch=2, limit=16).name == "step-000003"
    assert same(checkpoint(straight, "vae")[0], checkpoint(split, "vae")[0])
    assert logged_steps(split, "vae") == [1, 2, 3]  # each call logs where it stopped
    assert sorted(p.name for p in (split / "vae").iterdir()) == ["step-000002", "step-000003"]  # keep=2


def test_every_stage_resumes_exactly(tmp_path, data):
    straight, split = tmp_path / "straight", tmp_path / "split"
    nano.train_vae(data, straight, steps=4, batch=2, limit=16)
    nano.train_vae(data, split, steps=2, batch=2, limit=16)
    nano.train_vae(data, split, steps=4, batch=2, limit=16)  # resumes at step 2 (constant LR: the bound may grow)
    vae, state = checkpoint(split, "vae")
    assert state["step"] == 4 and same(checkpoint(straight, "vae")[0], vae)

    nano.train_sd(data, straight, steps=3, batch=4, limit=16)
    nano.train_sd(data, split, steps=1, batch=4, limit=16)
    nano.train_sd(data, split, steps=3, batch=4, limit=16)  # the warmup is a function of the step alone
    sd = checkpoint(straight, "sd")[0]
    assert same(sd, checkpoint(split, "sd")[0])
    assert not torch.equal(sd["ema_unet.conv_in.weight"], sd["unet.conv_in.weight"])

    # Decoder-only fine-tuning leaves the encoder (so the latents) untouched. The split stops on the
    # time budget after step 1, then resumes in the middle of the cosine over steps=2.
    nano.train_decoder(data, straight, steps=2, batch=2, limit=16)
    nano.train_decoder(data, split, steps=2, batch=2, limit=16, minutes=0)
    nano.train_decoder(data, split, steps=2, batch=2, limit=16)
    decoder = checkpoint(straight, "decoder")[0]
    assert same(decoder, checkpoint(split, "decoder")[0])
    assert all(torch.equal(vae[k], decoder[k]) for k in decoder if k.startswith(("vae.encoder.", "vae.quant_conv.")))
    assert not torch.equal(vae["vae.decoder.conv_out.weight"], decoder["vae.decoder.conv_out.weight"])
    with pytest.raises(ValueError, match="'steps': 2"):  # the cosine spans steps: a resume may not change it
        nano.train_decoder(data, split, steps=3, batch=2, limit=16)

    # The second pass (whole images) starts from the first: split into three calls.
    nano.train_decoder(data, straight, steps=3, batch=2, crop=128, limit=16, name="decoder2")
    for _ in range(2):
        nano.train_decoder(data, split, steps=3, batch=2, crop=128, limit=16, name="decoder2", minutes=0)
    assert checkpoint(split, "decoder2")[1]["step"] == 2
    with pytest.raises(ValueError, match="decoder2 stopped at step 2 of the 3"):  # only a finished cosine exports
        nano.export(split, tmp_path / "unfinished")
    nano.train_decoder(data, split, steps=3, batch=2, crop=128, limit=16, name="decoder2")
    decoder2 = checkpoint(straight, "decoder2")[0]
    assert same(decoder2, checkpoint(split, "decoder2")[0])
    assert not torch.equal(decoder["vae.decoder.conv_out.weight"], decoder2["vae.decoder.conv_out.weight"])
    assert torch.equal(nano.load_trained_vae(straight).decoder.conv_out.weight, decoder2["vae.decoder.conv_out.weight"])
    with pytest.raises(ValueError, match="decoder pass"):
        nano.train_decoder(data, straight, steps=1, name="decoder3")

    out = nano.export(straight, tmp_path / "nano-sd")
    record = json.loads((out / "TRAINING.json").read_text())
    assert record["decoder"]["steps"] == 2 and record["decoder2"]["steps"] == 3
    assert any("--name decoder2" in c and "--steps 3" in c and "--crop 128" in c for c in record["commands"])
    for command in record["commands"][1:-1]:  # the stages' commands: what the CLI parses back to this run
        args = vars(nano.parser().parse_args(shlex.split(command)[3:]))
        name = args.pop("name", args["stage"])
        assert args["steps"] == record[name]["steps"] and args["minutes"] is None
        assert all(args[k] == v for k, v in record[name]["recipe"].items() if k in args)
    from ctrlnet.base import load_base
    base = load_base(out)
    assert base.prediction_type == "v_prediction" and base.scheduler.config.rescale_betas_zero_snr
    assert torch.equal(base.unet.conv_in.weight, sd["ema_unet.conv_in.weight"])


def test_bundled_training_commands_ask_for_the_recorded_steps():
    record = json.loads((NANO_SD / "TRAINING.json").read_text())
    stages = [shlex.split(c)[3:] for c in record["commands"] if c.startswith("python -m ctrlnet.testbed.nano ")]
    assert len(stages) == 5 and stages[-1][0] == "export"
    for words in stages[:-1]:
        args = nano.parser().parse_args(words)
        name = args.name if args.stage == "decoder" else args.stage
        assert args.steps == record[name]["steps"] and args.minutes is None

"""ControlNet reuse (``every=k``): a net runs at the first of its active steps and every k-th
after, its last residuals are reused in between; counted with a forward hook on a real tiny net."""

import numpy as np
import pytest
import torch

from ctrlnet.base import load_base
from ctrlnet.cli import parse_control
from ctrlnet.pipeline import Control, Pipeline
from ctrlnet.pipeline.sampling import ActiveControl
from ctrlnet.testbed.tiny import write_tiny_base

from pipeline.test_pipeline import condition, count_batches, trained_looking


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    base = load_base(write_tiny_base(tmp_path_factory.mktemp("reuse") / "sd15", "sd15"))
    return Pipeline(base, {"net": trained_looking(base)})


def latents(pipe, **control):
    return pipe("a", controls=[Control("net", condition(), **control)], steps=8, seed=3, output_type="latent",
                scheduler="ddim").latents


@pytest.mark.parametrize("every, start, end, runs", [(1, 0.0, 1.0, 8), (2, 0.0, 1.0, 4), (3, 0.0, 1.0, 3),
                                                     (2, 0.5, 1.0, 2), (1000, 0.0, 1.0, 1), (2, 0.25, 0.75, 2)])
def test_the_net_runs_at_every_kth_active_step(pipe, every, start, end, runs):
    net = pipe.controlnets["net"]
    seen = count_batches(net)
    try:
        latents(pipe, every=every, start=start, end=end)
    finally:
        net._forward_pre_hooks.clear()
    assert len(seen) == runs


def test_every_1_is_the_plain_loop_and_k_changes_little(pipe):
    plain = latents(pipe)
    assert torch.equal(latents(pipe, every=1), plain)
    none = pipe("a", steps=8, seed=3, output_type="latent", scheduler="ddim").latents
    two = latents(pipe, every=2)
    # reuse moves the result, but far less than dropping the control altogether
    assert not torch.equal(two, plain)
    assert (two - plain).abs().mean() < 0.5 * (none - plain).abs().mean()


def test_reused_residuals_are_the_last_computed_ones(pipe):
    """every = steps: the net runs once, at step 0; its residuals act at every step. Same as a net
    whose output is frozen at step 0's: recorded by a hook on the real net and replayed."""
    net = pipe.controlnets["net"]
    outputs = []
    net.register_forward_hook(lambda m, args, out: outputs.append(out))
    try:
        once = latents(pipe, every=8)
    finally:
        net._forward_hooks.clear()
    assert len(outputs) == 1
    first = outputs[0]
    net.register_forward_hook(lambda m, args, out: first)  # every step now gets step 0's residuals
    try:
        frozen = latents(pipe)
    finally:
        net._forward_hooks.clear()
    assert torch.equal(once, frozen)


@pytest.mark.parametrize("every", [0, -1, 1.5, True])
def test_bad_every_is_refused(every):
    with pytest.raises(ValueError, match="every"):
        Control("net", np.zeros((8, 8, 3), np.uint8), every=every).check()
    with pytest.raises(ValueError, match="every"):
        ActiveControl(None, torch.zeros(1), every=every)


def test_cli_spec_and_parameters_text(pipe):
    c = parse_control("model=net,image=x.png,every=3")
    assert c.every == 3
    with pytest.raises(ValueError, match="every=2.5: expected a whole number"):
        parse_control("model=net,image=x.png,every=2.5")
    result = pipe("a", controls=[Control("net", condition(), every=2)], steps=2, seed=0, output_type="latent")
    assert "Every: 2" in result.parameters[0]

"""Packed oneDNN weights for CPU inference (ctrlnet.prepack): same results as PyTorch's plain
kernels, used only where they apply, repacked when a weight changes, nothing left behind."""

import gc

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ctrlnet import prepack
from ctrlnet.prepack import PackedWeights

pytestmark = pytest.mark.skipif(not prepack.available(), reason="PyTorch built without oneDNN")


def ops_run(fn) -> set[str]:
    """Names of the operators ``fn`` runs on the CPU."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


@pytest.mark.parametrize("kwargs, shape", [
    ({"kernel_size": 3, "padding": 1}, (2, 8, 9, 7)),
    ({"kernel_size": 3, "stride": 2, "padding": 1}, (1, 8, 16, 16)),
    ({"kernel_size": 1, "bias": False}, (3, 8, 5, 5)),
    ({"kernel_size": 3, "padding": 1, "groups": 2}, (2, 8, 6, 6)),
    ({"kernel_size": 3, "dilation": 2, "padding": 2}, (1, 8, 10, 10)),
])
def test_conv2d_matches_plain_kernel(kwargs, shape):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, **kwargs).eval()
    x = torch.randn(shape)
    packed = PackedWeights()
    with torch.no_grad():
        expected = conv(x)
        with packed.active():
            got = conv(x)
            ops = ops_run(lambda: conv(x))
    assert "mkldnn::_convolution_pointwise" in ops and "aten::mkldnn_convolution" not in ops
    assert len(packed) == 1 and packed.nbytes > 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # channels-last and strided (non-contiguous) inputs give the same values
    wide = torch.randn(shape[0], 16, *shape[2:])
    with torch.no_grad():
        expected_strided = conv(wide[:, ::2].contiguous())
        with packed.active():
            torch.testing.assert_close(conv(x.to(memory_format=torch.channels_last)), expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(conv(wide[:, ::2]), expected_strided, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(5, 16), (2, 7, 16), (1, 16)])
def test_linear_matches_plain_kernel(shape):
    torch.manual_seed(0)
    linear = nn.Linear(16, 24).eval()
    x = torch.randn(shape)
    packed = PackedWeights(linear=True)
    with torch.no_grad():
        expected = linear(x)
        with packed.active():
            got = linear(x)
            ops = ops_run(lambda: linear(x))
    assert "mkldnn::_linear_pointwise" in ops
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_linear_layers_are_not_packed_by_default():
    linear = nn.Linear(16, 24).eval()
    packed = PackedWeights()
    with torch.no_grad(), packed.active():
        ops = ops_run(lambda: linear(torch.randn(3, 16)))
    assert "mkldnn::_linear_pointwise" not in ops and len(packed) == 0


def test_weight_changed_in_place_or_new_shape_is_repacked():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1).eval()
    x = torch.randn(1, 4, 8, 8)
    packed = PackedWeights()
    with torch.no_grad(), packed.active():
        conv(x)
        conv.weight.mul_(2)  # e.g. a training step between two monitor samples
        torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1), rtol=1e-5, atol=1e-5)
        y = torch.randn(2, 4, 5, 6)  # another input shape: packed again for it, same values
        torch.testing.assert_close(conv(y), F.conv2d(y, conv.weight, conv.bias, padding=1), rtol=1e-5, atol=1e-5)
    assert len(packed) == 1


def test_not_used_for_training_fp64_or_outside_the_context():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    x = torch.randn(1, 4, 8, 8)
    packed = PackedWeights()
    with packed.active():  # gradients needed: the plain kernel, and gradients flow
        conv(x).sum().backward()
    assert conv.weight.grad is not None and len(packed) == 0
    with torch.no_grad(), packed.active():
        conv.double()(x.double())  # not a packed dtype
        assert conv.float()(x[:0]).shape == (0, 4, 8, 8)  # an empty batch: the plain kernel
    assert len(packed) == 0
    conv.float()
    with torch.no_grad():
        ops = ops_run(lambda: conv(x))  # outside the context: PyTorch's own kernel
    assert "aten::mkldnn_convolution" in ops or "aten::_convolution" in ops
    assert "mkldnn::_convolution_pointwise" not in ops


def test_packed_copy_freed_with_its_weight():
    packed = PackedWeights()
    conv = nn.Conv2d(4, 4, 3).eval()
    with torch.no_grad(), packed.active():
        conv(torch.randn(1, 4, 6, 6))
    assert len(packed) == 1
    del conv
    gc.collect()
    assert len(packed) == 0 and packed._cache == {}


def test_in_place_releases_and_restores_weights_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=2)).eval()
    x = torch.randn(2, 4, 6, 6)
    before = [p.detach().clone() for p in model.parameters()]
    packed = PackedWeights(in_place=True)
    with torch.no_grad():
        expected = model(x)
        with packed.active():
            got = model(x)
            assert model[0].weight.numel() == 0 and model[1].weight.numel() == 0  # storage released
            assert model[0].bias.numel() == 8  # biases are not packed
            torch.testing.assert_close(model(x[:1]), expected[:1], rtol=1e-5, atol=1e-5)  # new shape: repacked
            with torch.enable_grad():  # a call the packed kernel cannot take: plain kernel, plain values
                y = model(x.requires_grad_())
            torch.testing.assert_close(y.detach(), expected, rtol=1e-5, atol=1e-5)
            x.requires_grad_(False)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # bit-exact, same Parameter objects
    assert len(packed) == 0 and packed.last_packed == 2 and packed.last_nbytes > 0


def test_in_place_restores_on_error():
    conv = nn.Conv2d(4, 4, 3).eval()
    before = conv.weight.detach().clone()
    with pytest.raises(RuntimeError, match="stop"):
        with torch.no_grad(), PackedWeights(in_place=True).active():
            conv(torch.randn(1, 4, 6, 6))
            raise RuntimeError("stop")
    assert torch.equal(conv.weight, before)

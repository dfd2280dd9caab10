"""NormalBAE (``normal_bae``): the published ``scannet.pt`` layout, the reference's pre/post-processing,
weight-file errors and search, batch == single.

The numbers of the published network (936 tensors, 72,422,336 parameters) were taken from the
reference: ``NNET(args)`` of ControlNet-v1-1-nightly ``annotator/normalbae`` (architecture 'BN',
its vendored gen-efficientnet ``tf_efficientnet_b5_ap``), instantiated in a scratch script; with
the same random weights our network's output equalled it exactly (max abs difference 0.0)."""

import numpy as np
import pytest
import torch

from ctrlnet.annotators import BATCH, get_annotator, normalbae, weights
from ctrlnet.annotators.weights import WeightsError, WeightsNotFound
from detector_fixtures import isolated  # noqa: F401 (fixtures)

PUBLISHED_KEYS = 936
PUBLISHED_PARAMETERS = 72_422_336


class NotATensor:  # a pickled object weights_only loading must refuse
    pass


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("normalbae")
    normalbae.write_random_weights(folder, seed=0)
    return folder


def photo(h=64, w=96, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 2.5, yy * 3.0, (xx + yy) * 1.3], -1) % 256
    return np.clip(base + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)


# 1. the published layout loads strictly

def test_random_file_has_the_published_layout_and_loads(folder):
    data = torch.load(folder / "scannet.pt", map_location="cpu", weights_only=True)
    assert set(data) == {"model", "iter"}
    state = data["model"]
    assert len(state) == PUBLISHED_KEYS and all(k.startswith("module.") for k in state)
    assert "module.encoder.original_model.blocks.6.2.se.conv_reduce.weight" in state
    assert tuple(state["module.decoder.out_conv_res1.0.weight"].shape) == (128, 132, 1)
    net = normalbae.load(str(folder / "scannet.pt"))
    assert sum(p.numel() for p in net.parameters()) == PUBLISHED_PARAMETERS
    assert not net.training
    assert [len(stage) for stage in net.encoder.original_model.blocks] == [3, 5, 5, 7, 7, 9, 3]


# 2. pre/post-processing with known answers

def test_tf_same_padding_pads_the_odd_pixel_at_the_bottom_right():
    c = normalbae.Conv2dSame(1, 1, 3, stride=2, bias=False)
    torch.nn.init.ones_(c.weight)
    out = c(torch.ones(1, 1, 6, 6))[0, 0]
    assert torch.equal(out, torch.tensor([[9.0, 9, 6], [9, 9, 6], [6, 6, 4]]))
    assert c(torch.ones(1, 1, 5, 5)).shape[-2:] == (3, 3)  # ceil(5 / 2), padded 1 each side
    assert c(torch.ones(1, 1, 5, 5))[0, 0, 0, 0] == 4


def test_norm_normalize():
    out = normalbae.norm_normalize(torch.tensor([3.0, 4.0, 0.0, 0.0]).view(1, 4, 1, 1)).flatten()
    assert torch.allclose(out, torch.tensor([0.6, 0.8, 0.0, 1.01]))
    kappa = normalbae.norm_normalize(torch.tensor([0.0, 0.0, 1.0, -50.0]).view(1, 4, 1, 1)).flatten()[3]
    assert torch.isclose(kappa, torch.tensor(0.01))  # elu -> -1: the minimum concentration


class Constant(torch.nn.Module):
    """Stands in for the network: records its input, answers a fixed (x, y, z) everywhere."""

    def __init__(self, normal):
        super().__init__()
        self.normal = torch.tensor([*normal, 1.0]).view(1, 4, 1, 1)
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x)
        return self.normal.expand(x.shape[0], 4, *x.shape[-2:])


def test_normals_become_colours_without_flips_truncated(monkeypatch):
    for normal, colour in (((0, 0, 1), (127, 127, 255)), ((-1, 0, 0), (0, 127, 127)),
                           ((0.6, -0.8, 0), (204, 25, 127))):
        monkeypatch.setattr(normalbae, "load", lambda model="", net=Constant(normal): net)
        out = normalbae.normal_bae(photo(40, 50))
        assert out.shape == (40, 50, 3) and out.dtype == np.uint8
        assert (out == np.array(colour, np.uint8)).all(), (normal, out[0, 0])


def test_input_is_imagenet_normalised_and_edge_padded_to_64(monkeypatch):
    net = Constant((0, 0, 1))
    monkeypatch.setattr(normalbae, "load", lambda model="": net)
    image = np.full((70, 50, 3), 100, np.uint8)
    image[-1] = (255, 0, 51)  # the last row, repeated by the edge padding
    normalbae.normal_bae(image)
    x = net.inputs[0][0]  # (3, 128, 64)
    assert x.shape == (3, 128, 64)
    mean, std = torch.tensor(normalbae.IMAGENET_MEAN), torch.tensor(normalbae.IMAGENET_STD)
    assert torch.allclose(x[:, 0, 0], (100 / 255 - mean) / std)
    assert torch.allclose(x[:, 127, 63], (torch.tensor([255, 0, 51]) / 255 - mean) / std)
    assert torch.allclose(x[:, 30, 63], x[:, 30, 49])  # right padding repeats the last column


# 3. bad weight files

def test_another_detectors_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / "scannet.pt"
    torch.save({"model": torch.nn.Conv2d(3, 8, 3).state_dict()}, path)
    with pytest.raises(WeightsError, match=r"scannet\.pt is not the NormalBAE.*missing"):
        normalbae.normal_bae(photo(), str(path))


def test_truncated_and_unsafe_files_are_errors(tmp_path, folder):
    truncated = tmp_path / "truncated" / "scannet.pt"
    truncated.parent.mkdir()
    truncated.write_bytes((folder / "scannet.pt").read_bytes()[:100_000])
    with pytest.raises(WeightsError, match="truncated"):
        normalbae.normal_bae(photo(), str(truncated))
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"model": {"x": NotATensor()}}, unsafe)
    with pytest.raises(WeightsError, match="refused"):
        normalbae.normal_bae(photo(), str(unsafe))


def test_missing_weights_name_the_places_searched(isolated):
    with pytest.raises(WeightsNotFound) as e:
        normalbae.normal_bae(photo())
    message = str(e.value)
    assert "scannet.pt" in message and str(isolated / "ann") in message
    assert "models--lllyasviel--Annotators" in message and "https://huggingface.co/lllyasviel/Annotators" in message
    with pytest.raises(WeightsNotFound, match="does not exist"):
        normalbae.normal_bae(photo(), str(isolated / "nowhere.pt"))


# 4. found where users keep it

def test_found_via_env_and_hub_cache(isolated, folder, monkeypatch):
    spec = normalbae.WEIGHTS["normal_bae"][0]
    snapshot = isolated / "hub" / "models--lllyasviel--Annotators" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "scannet.pt").symlink_to(folder / "scannet.pt")  # as the hub links its blobs
    (isolated / "hub" / "models--lllyasviel--Annotators" / "refs").mkdir()
    (isolated / "hub" / "models--lllyasviel--Annotators" / "refs" / "main").write_text("abc123")
    assert weights.find("normal_bae", spec) == snapshot / "scannet.pt"
    monkeypatch.setenv("CTRLNET_ANNOTATORS", str(folder))
    assert weights.find("normal_bae", spec) == folder / "scannet.pt"  # the env folder comes first
    assert get_annotator("normal_bae")(photo(32, 40)).shape == (32, 40, 3)


# 5. batch == single, end to end

def test_batch_equals_single_end_to_end(folder):
    assert BATCH["normal_bae"] is normalbae.normal_maps
    annotate = get_annotator("normal_bae", model=str(folder / "scannet.pt"))
    images = [photo(60, 64, seed=s) for s in range(2)]  # padded to 64 x 64
    singles = [annotate(i) for i in images]
    assert all(s.shape == (60, 64, 3) and s.dtype == np.uint8 for s in singles)
    assert len(np.unique(singles[0].reshape(-1, 3), axis=0)) > 1  # random weights still vary over the image
    batch = annotate(images)  # one forward pass (BATCH)
    assert all(np.array_equal(a, b) for a, b in zip(singles, batch))

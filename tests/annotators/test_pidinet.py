"""PiDiNet soft edges (``softedge_pidinet``, ``softedge_pidisafe``, ``scribble_pidinet``): the
published weight layout, the pixel-difference -> vanilla conversion against the pixel-difference
convolutions written out from their definition, pre/post-processing with known answers, bad files,
where weights are found, batch == single."""

import pathlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ctrlnet.annotators import get_annotator, hed, pidinet, weights
from ctrlnet.annotators.weights import WeightsError, WeightsNotFound
from detector_fixtures import blob_photo as photo, isolated, one_torch_thread  # noqa: F401 (fixtures)

NAMES = ("softedge_pidinet", "softedge_pidisafe", "scribble_pidinet")
# From the reference (ControlNet-v1-1-nightly annotator/pidinet/model.py, ``pidinet()`` = PiDiNet(60,
# carv4, dil=24, sa=True), instantiated in a scratch script): 83 tensors, 710,149 parameters in the
# pixel-difference layout the file holds (2.8 MB of fp32). Converted, the 4 ``rd`` depthwise
# kernels (60 + 120 + 240 + 240 channels) grow from 3x3 to 5x5: 16 more weights a channel.
KEYS, PARAMETERS = 83, 710_149
CONVERTED = PARAMETERS + 16 * (60 + 120 + 240 + 240)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("pidi")
    pidinet.write_random_weights(d, seed=0)
    return d


# --- the pixel-difference convolutions, from their definition (Su et al. 2021) -------------------

OFFSETS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]  # 3x3 taps, row-major
RING = [0, 1, 2, 5, 8, 7, 6, 3]  # the outer taps, clockwise from the top left


def pdc(op: str, x: torch.Tensor, w: torch.Tensor, groups: int) -> torch.Tensor:
    """y = sum over taps of w_tap * (a pixel difference), zero outside the image:
    cv: x_tap; cd: x_tap - x_centre; ad: x_tap - x_next_clockwise(tap) (ring taps only);
    rd: for taps 1..8 (row-major, the reference's choice), along the direction d of the m-th
    neighbour: x_at_2d - x_at_d."""
    h, wd = x.shape[2:]
    xp = F.pad(x, (2, 2, 2, 2))

    def at(dy, dx):
        return xp[:, :, 2 + dy:2 + dy + h, 2 + dx:2 + dx + wd]

    if op == "cv":
        terms = [(k, at(*OFFSETS[k])) for k in range(9)]
    elif op == "cd":
        terms = [(k, at(*OFFSETS[k]) - at(0, 0)) for k in range(9)]
    elif op == "ad":
        terms = [(k, at(*OFFSETS[k]) - at(*OFFSETS[RING[(i + 1) % 8]])) for i, k in enumerate(RING)]
    else:
        neighbours = [o for o in OFFSETS if o != (0, 0)]
        terms = [(m + 1, at(2 * dy, 2 * dx) - at(dy, dx)) for m, (dy, dx) in enumerate(neighbours)]
    y = 0
    for k, d in terms:
        wk = w[:, :, k // 3, k % 3]  # (O, I / groups)
        y = y + (torch.einsum("oi,nihw->nohw", wk, d) if groups == 1 else wk[:, 0][None, :, None, None] * d)
    return y


class PDCConv(nn.Module):
    def __init__(self, op, cin, cout, groups):
        super().__init__()
        self.op, self.groups = op, groups
        self.weight = nn.Parameter(torch.zeros(cout, cin // groups, 3, 3))

    def forward(self, x):
        return pdc(self.op, x, self.weight, self.groups)


def pdc_network(state) -> nn.Module:
    """The pixel-difference form: our network with layer 0 and every block's conv1 replaced by the
    pixel-difference convolutions above, holding the file's (unconverted) weights."""
    net = pidinet.PiDiNet()
    net.init_block = PDCConv(pidinet.PDCS[0], 3, pidinet.WIDTH, 1)
    for op, name in zip(pidinet.PDCS[1:], pidinet.BLOCKS):
        c = getattr(net, name).conv1.in_channels
        getattr(net, name).conv1 = PDCConv(op, c, c, c)
    net.load_state_dict(state, strict=True)
    return net.eval()


def random_state(seed=0, std=0.2):
    """A random PDC-layout state dict with weights large enough for a structured, unsaturated map."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * std for k, v in pidinet.random_pdc_state(0).items()}


@pytest.mark.parametrize("op", ["cv", "cd", "ad", "rd"])
def test_each_conversion_equals_its_pixel_difference_form(op):
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(2, 3, 9, 11, generator=g), torch.randn(4, 3, 3, 3, generator=g)
    kernel = pidinet.convert_pdc(op, w)
    ours = F.conv2d(x, kernel, padding=kernel.shape[-1] // 2)
    assert torch.allclose(ours, pdc(op, x, w, 1), atol=1e-5)
    assert kernel.shape[-1] == (5 if op == "rd" else 3)


def test_converted_network_equals_pixel_difference_network(tmp_path):
    state = random_state()
    path = tmp_path / "table5_pidinet.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, path)
    image = photo(64, 64)
    x = pidinet.to_input(image[None])
    with torch.no_grad():
        reference = pdc_network(state)(x)
        ours = pidinet.load("softedge_pidinet", str(path)).cpu()(x)
    assert ours.shape == (1, 1, 64, 64) and reference.std() > 0.05  # a structured map, not a constant
    assert torch.allclose(ours, reference, atol=1e-4)
    expected = (reference[0, 0].numpy() * 255).clip(0, 255).astype(np.int64)
    assert np.abs(pidinet.softedge_pidinet(image, model=str(path))[..., 0] - expected).max() <= 1


def test_published_layout_loads_strictly(folder):
    raw = torch.load(folder / "table5_pidinet.pth", weights_only=True)
    assert list(raw) == ["state_dict"]
    state = raw["state_dict"]
    assert len(state) == KEYS and sum(v.numel() for v in state.values()) == PARAMETERS
    assert all(k.startswith("module.") for k in state)
    assert state["module.init_block.weight"].shape == (60, 3, 3, 3)
    assert state["module.block1_2.conv1.weight"].shape == (60, 1, 3, 3)  # rd: 3x3 in the file
    assert state["module.dilations.3.conv2_4.weight"].shape == (24, 24, 3, 3)
    net = pidinet.load("softedge_pidinet", str(folder / "table5_pidinet.pth"))
    assert len(net.state_dict()) == KEYS and sum(p.numel() for p in net.parameters()) == CONVERTED
    assert net.block1_2.conv1.weight.shape == (60, 1, 5, 5)


def test_preprocessing_and_output_on_known_answers(tmp_path):
    img = np.zeros((1, 2, 2, 3), np.uint8)
    img[0, 0, 0] = (255, 0, 0)  # red
    img[0, 1, 1] = (0, 0, 51)  # dark blue
    x = pidinet.to_input(img)  # BGR / 255
    assert x.shape == (1, 3, 2, 2) and x.dtype == torch.float32
    assert x[0, :, 0, 0].tolist() == [0, 0, 1] and torch.allclose(x[0, :, 1, 1], torch.tensor([0.2, 0, 0]))
    # every weight zero but the classifier's bias b: the map is sigmoid(b) everywhere
    state = {k: torch.zeros_like(v) for k, v in pidinet.random_pdc_state(0).items()}
    for b, soft, safe in ((2.0, int(255 / (1 + np.exp(-2.0))), 255), (0.0, 127, 127), (-3.0, 12, 0)):
        state["classifier.bias"][0] = b
        path = tmp_path / f"{b}.pth"
        torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, path)
        image = photo(40, 70)  # padded to 64 x 128 and cropped back
        out = pidinet.softedge_pidinet(image, model=str(path))
        assert out.shape == (40, 70, 3) and (out == soft).all()
        assert (pidinet.softedge_pidisafe(image, model=str(path)) == safe).all()
        if b != 0:  # a flat map: every line is flat, so nms keeps it all where it is over 127 (not 127 itself:
            # its blur is 127 give or take float rounding)
            assert (pidinet.scribble_pidinet(image, model=str(path)) == (255 if soft > 127 else 0)).all()
    torch.save({"state_dict": state}, tmp_path / "plain.pth")  # without the "module." prefix it loads too
    assert (pidinet.softedge_pidinet(photo(), model=str(tmp_path / "plain.pth")) == 12).all()


def test_other_networks_file_is_an_error_naming_it(tmp_path):
    hed.write_random_weights(tmp_path)
    with pytest.raises(WeightsError, match=r"ControlNetHED\.pth is not the PiDiNet soft-edge network.*missing"):
        pidinet.softedge_pidinet(photo(), model=str(tmp_path / "ControlNetHED.pth"))
    state = pidinet.random_pdc_state(0)
    state["block1_2.conv1.weight"] = torch.zeros(60, 1, 5, 5)  # a 5x5 rd kernel: not the published layout
    torch.save({"state_dict": state}, tmp_path / "odd.pth")
    with pytest.raises(WeightsError, match=r"odd\.pth is not the PiDiNet.*block1_2\.conv1\.weight has shape \(60, 1, 5, 5\), expected 3x3"):
        pidinet.softedge_pidinet(photo(), model=str(tmp_path / "odd.pth"))


def test_truncated_and_unsafe_files(tmp_path, folder):
    cut = tmp_path / "table5_pidinet.pth"
    cut.write_bytes((folder / "table5_pidinet.pth").read_bytes()[:50_000])
    with pytest.raises(WeightsError, match=r"table5_pidinet\.pth could not be read .*truncated"):
        pidinet.softedge_pidinet(photo(), model=str(cut))
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"state_dict": {"x": pathlib.PurePosixPath("x")}}, unsafe)  # a pickled non-tensor object
    with pytest.raises(WeightsError, match=r"unsafe\.pth holds pickled objects other than tensors"):
        pidinet.softedge_pidinet(photo(), model=str(unsafe))


def test_missing_names_the_places_searched(isolated):
    with pytest.raises(WeightsNotFound) as e:
        get_annotator("softedge_pidisafe")(photo())
    message = str(e.value)
    assert "table5_pidinet.pth" in message and "huggingface.co/lllyasviel/Annotators" in message
    assert str(isolated / "ann") in message and str(isolated / "hub" / "models--lllyasviel--Annotators") in message


def test_found_via_env_and_hub_cache(isolated, folder):
    data = (folder / "table5_pidinet.pth").read_bytes()
    img = photo()
    direct = pidinet.softedge_pidinet(img, model=str(folder / "table5_pidinet.pth"))
    snapshot = isolated / "hub" / "models--lllyasviel--Annotators" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "table5_pidinet.pth").write_bytes(data)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    assert weights.find("softedge_pidinet", pidinet.PIDINET) == snapshot / "table5_pidinet.pth"
    assert np.array_equal(get_annotator("softedge_pidinet")(img), direct)
    (isolated / "ann" / "table5_pidinet.pth").write_bytes(data)  # $CTRLNET_ANNOTATORS/FILE comes first
    assert weights.find("softedge_pidinet", pidinet.PIDINET) == isolated / "ann" / "table5_pidinet.pth"
    assert np.array_equal(get_annotator("softedge_pidinet")(img), direct)


def test_batch_equals_single_and_end_to_end(tmp_path):
    state = random_state(seed=2)
    path = tmp_path / "table5_pidinet.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, path)
    model = str(path)
    images = [photo(64, 80, seed=s) for s in range(2)]
    for name in NAMES:
        single = [pidinet.ANNOTATORS[name](i, model=model) for i in images]
        assert all(np.array_equal(a, b) for a, b in zip(single, pidinet.BATCH[name](images, model=model)))
        assert single[0].shape == (64, 80, 3) and single[0].dtype == np.uint8
    assert len(np.unique(single[0])) == 2 and 0.01 < (single[0] > 0).mean() < 0.9  # scribble: some strokes
    bound = get_annotator("scribble_pidinet", model=model)
    assert np.array_equal(bound(images[0]), single[0])
    assert all(np.array_equal(a, b) for a, b in zip(bound(images), single))  # through detect_many

"""Finding a detector's weights offline (model=, $CTRLNET_ANNOTATORS, ~/.cache/ctrlnet/annotators,
the A1111 / comfyui_controlnet_aux layouts, the Hugging Face cache with refs/main) and loading them
safely (weights_only pickles, strict keys and shapes, nothing half-loaded, cached once)."""

import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ctrlnet.annotators import weights as W
from ctrlnet.annotators.weights import Weights, WeightsError, WeightsNotFound

NET = Weights("net.pth", ("someone/Annotators",), "a test network")
FOLDER = Weights("", ("org/depth-small-hf", "org/depth-large-hf"), "a test depth model")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No real home, annotator folder or hub cache is ever searched."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(W, "ANNOTATORS_DIR", Path("~/.cache/ctrlnet/annotators"))  # the real default, HOME moved
    monkeypatch.delenv("CTRLNET_ANNOTATORS", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    W.clear_cache()
    yield
    W.clear_cache()


def touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_search_order_env_then_home_then_hub(tmp_path, monkeypatch):
    hub = touch(tmp_path / "hub/models--someone--Annotators/snapshots/abc/net.pth")
    assert W.find("t", NET) == hub
    home = touch(tmp_path / "home/.cache/ctrlnet/annotators/net.pth")
    assert W.find("t", NET) == home
    env = touch(tmp_path / "mine/net.pth")
    monkeypatch.setenv("CTRLNET_ANNOTATORS", f"{tmp_path / 'empty'}{os.pathsep}{tmp_path / 'mine'}")
    assert W.find("t", NET) == env
    given = touch(tmp_path / "elsewhere/renamed.pth")
    assert W.find("t", NET, given) == given  # model= wins, whatever its name


@pytest.mark.parametrize("layout", ["someone/Annotators/net.pth",  # comfyui_controlnet_aux ckpts/
                                    "Annotators/net.pth",
                                    "hed/net.pth"])  # the A1111 extension's annotator/downloads/<module>/
def test_layouts_of_other_tools(tmp_path, monkeypatch, layout):
    monkeypatch.setenv("CTRLNET_ANNOTATORS", str(tmp_path / "ckpts"))
    path = touch(tmp_path / "ckpts" / layout)
    assert W.find("t", NET) == path


def test_hub_cache_prefers_refs_main_and_honours_hf_home(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    repo = tmp_path / "hfhome/hub/models--someone--Annotators"
    old = touch(repo / "snapshots/old/net.pth")
    new = touch(repo / "snapshots/new/net.pth")
    os.utime(old, (1, 1)), os.utime(old.parent, (1, 1))
    assert W.find("t", NET) == new  # newest when refs/main names none
    touch(repo / "refs/main", b"old")
    assert W.find("t", NET) == old


def test_transformers_folder_found_by_repo_name_and_alternatives(tmp_path, monkeypatch):
    monkeypatch.setenv("CTRLNET_ANNOTATORS", str(tmp_path / "ann"))
    touch(tmp_path / "ann/depth-large-hf/model.safetensors")  # no config.json: not a model folder
    with pytest.raises(WeightsNotFound):
        W.find("t", FOLDER)
    touch(tmp_path / "ann/depth-large-hf/config.json", b"{}")
    assert W.find("t", FOLDER) == tmp_path / "ann/depth-large-hf"  # the second repo does
    snap = touch(tmp_path / "hub/models--org--depth-small-hf/snapshots/r1/config.json", b"{}").parent
    assert W.find("t", FOLDER) == tmp_path / "ann/depth-large-hf"  # $CTRLNET_ANNOTATORS before the hub
    monkeypatch.delenv("CTRLNET_ANNOTATORS")
    assert W.find("t", FOLDER) == snap
    with pytest.raises(WeightsError, match="no config.json"):
        W.find("t", FOLDER, tmp_path / "ann")


def test_missing_names_the_file_every_place_and_where_it_is_published(tmp_path):
    with pytest.raises(WeightsNotFound) as e:
        W.find("softedge_x", NET)
    msg = str(e.value)
    assert "\n" not in msg and "net.pth" in msg and "softedge_x" in msg
    assert "$CTRLNET_ANNOTATORS (unset)" in msg and str(tmp_path / "home/.cache/ctrlnet/annotators") in msg
    assert str(tmp_path / "hub/models--someone--Annotators") in msg
    assert "https://huggingface.co/someone/Annotators" in msg and "model=PATH" in msg
    with pytest.raises(WeightsNotFound, match="does not exist"):
        W.find("t", NET, tmp_path / "nope.pth")


class Tiny(torch.nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, width, 3)
        self.norm = torch.nn.BatchNorm2d(width)


class Other(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 3)


def test_reads_pickles_and_safetensors_and_unwraps(tmp_path):
    state = Tiny().state_dict()
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, tmp_path / "a.pth")
    read = W.strip_prefix(W.read_state_dict(tmp_path / "a.pth", "t", "x"))
    assert set(read) == set(state)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "b.safetensors")
    assert set(W.read_state_dict(tmp_path / "b.safetensors", "t", "x")) == set(state)


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize("kind", ["truncated", "unsafe", "text", "empty_safetensors", "no_tensors"])
def test_bad_files_are_refused_naming_the_file(tmp_path, kind):
    path = tmp_path / ("w.safetensors" if kind == "empty_safetensors" else "w.pth")
    if kind == "truncated":
        torch.save(Tiny().state_dict(), path)
        path.write_bytes(path.read_bytes()[:200])
    elif kind == "unsafe":
        path.write_bytes(pickle.dumps({"conv.weight": Payload()}))
    elif kind == "text":
        path.write_text("<html>not a checkpoint</html>")
    elif kind == "empty_safetensors":
        path.write_bytes(b"\x10\x00")
    else:
        torch.save({"epoch": 3}, path)
    with pytest.raises(WeightsError) as e:
        W.read_state_dict(path, "softedge_x", "a test network")
    assert str(path) in str(e.value) and "softedge_x" in str(e.value)
    if kind == "unsafe":
        assert "weights_only" in str(e.value)


def test_load_strict_checks_everything_before_assigning(tmp_path):
    net = Tiny()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(WeightsError, match=r"is not a test network: .*missing.*unknown \(fc.bias, fc.weight\)"):
        W.load_strict(net, Other().state_dict(), tmp_path / "other.pth", "t", "a test network")
    wide = Tiny(8).state_dict()
    wide["conv.weight"] = wide["conv.weight"] + 1  # would change if anything were assigned
    with pytest.raises(WeightsError, match=r"other shapes \(conv.bias: \(8,\) in the file, \(4,\) expected\)"):
        W.load_strict(net, wide, tmp_path / "wide.pth", "t", "a test network")
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # nothing half-loaded
    good = Tiny().state_dict()
    assert W.load_strict(net, good, "p", "t", "x").training is False
    assert torch.equal(net.conv.weight, good["conv.weight"])


def test_check_folder_names_the_wrong_architecture(tmp_path):
    touch(tmp_path / "f/config.json", b'{"model_type": "segformer", "architectures": ["SegformerForSemanticSegmentation"]}')
    with pytest.raises(WeightsError, match=r"holds a 'segformer' model .*expected a depth model \(model_type dpt\)"):
        W.check_folder(tmp_path / "f", "depth_x", ("dpt",), "a depth model")
    assert W.check_folder(tmp_path / "f", "seg_x", ("segformer",), "x")["model_type"] == "segformer"


def test_cache_loads_once_and_again_when_the_file_changes(tmp_path):
    path = touch(tmp_path / "net.pth", b"1")
    calls = []
    build = lambda: calls.append(1) or len(calls)
    assert W.cached(path, "tiny", build) == 1 and W.cached(path, "tiny", build) == 1
    path.write_bytes(b"22")  # another size: another file
    assert W.cached(path, "tiny", build) == 2
    assert W.cached(path, "other-kind", build) == 3

    def failing():
        raise WeightsError("bad")
    other = touch(tmp_path / "bad.pth")
    with pytest.raises(WeightsError):
        W.cached(other, "tiny", failing)
    assert W.cached(other, "tiny", build) == 4  # a failed build is not kept


def test_alternatives_are_found_place_by_place(tmp_path, monkeypatch):
    """Any of several files will do (MiDaS: the .pt or a transformers folder): the README's place
    order wins over the order of the alternatives."""
    need = (NET, FOLDER)
    hub = touch(tmp_path / "hub/models--someone--Annotators/snapshots/abc/net.pth")
    assert W.find_any("t", need) == hub
    monkeypatch.setenv("CTRLNET_ANNOTATORS", str(tmp_path / "ann"))
    folder = touch(tmp_path / "ann/depth-small-hf/config.json", b"{}").parent
    assert W.find_any("t", need) == folder  # $CTRLNET_ANNOTATORS before the hub, though second
    file = touch(tmp_path / "ann/net.pth")
    assert W.find_any("t", need) == file  # one place: the first alternative
    assert W.find_any("t", need, folder) == folder  # model= of either kind
    for p in (hub, file):
        p.unlink()
    (folder / "config.json").unlink()
    with pytest.raises(WeightsNotFound, match=r"net.pth .*any of these would do instead.*org/depth-small-hf"):
        W.find_any("t", need)


def test_a_folder_is_loaded_again_when_a_file_in_it_changes(tmp_path):
    folder = touch(tmp_path / "model/config.json", b"{}").parent
    weights = touch(folder / "model.safetensors", b"1")
    calls = []
    build = lambda: calls.append(1) or len(calls)
    assert W.cached(folder, "tiny", build) == 1 and W.cached(folder, "tiny", build) == 1
    weights.write_bytes(b"22")  # overwritten in place: the folder's own mtime may not change
    assert W.cached(folder, "tiny", build) == 2

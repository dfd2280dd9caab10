"""Fixtures of the detector tests, imported by the test modules that use them (a conftest.py in
tests/annotators/ would shadow tests/conftest.py, which tests import helpers from): one torch thread (their networks run on small images, where one
thread is as fast, and two threads on a shared 2-core machine wait on each other, 5-20x slower);
``isolated``: no real place is searched for detector weights."""

import cv2
import numpy as np
import pytest
import torch

from ctrlnet.annotators import weights


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """The annotator folder, hub cache and home are empty tmp dirs (``tmp_path / "ann"``, ``"hub"``,
    ``"home"``), and no detector stays cached from another test."""
    for var, sub in (("CTRLNET_ANNOTATORS", "ann"), ("HF_HUB_CACHE", "hub"), ("HOME", "home")):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.delenv("HF_HOME", raising=False)
    weights.clear_cache()
    yield tmp_path
    weights.clear_cache()


@pytest.fixture
def no_weight_places(monkeypatch, tmp_path):
    """Nothing from the real home or hub cache is found; ``$CTRLNET_ANNOTATORS`` unset."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("CTRLNET_ANNOTATORS", raising=False)
    monkeypatch.delenv("CTRLNET_ANNOTATOR_DEVICE", raising=False)
    monkeypatch.setattr(weights, "ANNOTATORS_DIR", tmp_path / "home" / "annotators")


def blob_photo(h=64, w=64, seed=0):
    """A noisy yellow disc on blue: edges for the soft-edge detectors."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), (40, 90, 160), np.uint8)
    cv2.circle(img, (w // 2, h // 2), min(h, w) // 3, (230, 200, 30), -1)
    return np.clip(img.astype(int) + rng.integers(-15, 15, img.shape), 0, 255).astype(np.uint8)


def line_photo(h=64, w=96, seed=0):
    """Blurred noise crossed by one dark line: for the line detectors."""
    rng = np.random.default_rng(seed)
    a = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3)).astype(np.uint8), (0, 0), 2)
    cv2.line(a, (4, h // 2), (w - 4, h // 3), (0, 0, 0), 2)
    return a

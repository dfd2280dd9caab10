"""Fixtures of the detector tests, imported by the test modules that use them (a conftest.py in
tests/annotators/ would shadow tests/conftest.py, which tests import helpers from): one torch thread (their networks run on small images, where one
thread is as fast, and two threads on a shared 2-core machine wait on each other, 5-20x slower);
``isolated``: no real place is searched for detector weights."""

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

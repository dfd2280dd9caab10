"""ctrlnet.allocator: freed CPU memory is reused instead of faulted in again (counted, not timed)."""

import json
import subprocess
import sys

import pytest

from ctrlnet.allocator import _glibc

CHURN = r"""
import json, resource, sys
import torch
from ctrlnet.allocator import retain_freed_memory
applied = retain_freed_memory()
for _ in range(15):  # the heap grows to fit the pattern in the first rounds (measured: up to 9)
    x = torch.ones(12 * 2**20)  # 48 MiB: served by mmap under glibc's defaults
    del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):  # a step's activations: allocated, written, freed
    x = torch.ones(12 * 2**20)
    del x
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def churn(setting: str) -> dict:
    env = {"CTRLNET_CPU_ALLOCATOR": setting, "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", CHURN], env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(_glibc() is None, reason="glibc only")
def test_retained_memory_is_reused_without_page_faults():
    system, retain = churn("system"), churn("retain")
    assert not system["applied"] and retain["applied"]
    # glibc's default maps and faults in the 48 MiB afresh every iteration (12,288 4-KiB pages each
    # here; fewer with larger pages or transparent huge pages); retained, the block is reused (0 here)
    assert system["faults"] >= 20
    assert retain["faults"] * 10 < system["faults"]


def test_bad_setting_names_the_variable(monkeypatch):
    import ctrlnet.allocator as allocator
    monkeypatch.setattr(allocator, "_applied", False)
    monkeypatch.setenv("CTRLNET_CPU_ALLOCATOR", "fast")
    with pytest.raises(ValueError, match="CTRLNET_CPU_ALLOCATOR"):
        allocator.retain_freed_memory()

"""Keep freed CPU memory in the process for reuse (glibc malloc), instead of handing it back.

PyTorch allocates CPU tensors with plain ``malloc``. glibc serves large blocks (above a threshold
that adapts between 128 KiB and 32 MiB) with ``mmap`` and returns them with ``munmap`` on free, and
it trims the heap's free top back to the kernel. A training or sampling step frees and re-allocates
the same activations every step, so each step maps fresh pages that the kernel must fault in and
zero: on the SD1.5-sized training step at 256 px, 1.5 M page faults per step for the diffusers recipe,
0.8 M for ours, and 43% of a short training run's CPU time in the kernel (BENCHMARKS.md, issue 5).

``retain_freed_memory()`` turns ``mmap`` off for ``malloc`` (``M_MMAP_MAX = 0``: every block comes
from the heap) and raises the trim threshold (``M_TRIM_THRESHOLD``), so freed blocks stay in the
process and the next step reuses them without faults. Peak RSS is about the same (the same live
tensors; +0.26 GiB measured on the SD1.5-sized step: freed blocks are kept, and a heap can fragment),
and the process keeps its high-water mark until it exits. It cannot be undone in the process.

Worker threads allocate from their own glibc arenas, which still map blocks above 64 MiB; the
setting is for work on the main thread. It is process-wide and applies to allocations made after the
call. ``ctrlnet generate``, ``ctrlnet eval`` and ``make demo`` call it; the ``Trainer`` calls it when
it trains on the CPU with ``TrainConfig.retain_cpu_memory`` on (the default); Python users of the
pipeline call it themselves. ``CTRLNET_CPU_ALLOCATOR=system`` turns it off everywhere. A no-op
outside glibc (macOS, Windows, musl).
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # the largest value mallopt's int takes: 2 GiB of free heap top before trimming
ENV = "CTRLNET_CPU_ALLOCATOR"

_applied = False


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # absent in musl and other C libraries
        return libc
    except (OSError, AttributeError):
        return None


def retain_freed_memory() -> bool:
    """Apply the setting (idempotent); True when it is in effect in this process."""
    global _applied
    if _applied:
        return True
    value = os.environ.get(ENV, "retain").strip().lower()
    if value in ("system", "default", "off", "0"):
        return False
    if value not in ("retain", "on", "1", ""):
        raise ValueError(f"{ENV}={value!r}: use 'retain' (the default) or 'system' (glibc's own behaviour)")
    libc = _glibc()
    if libc is None:
        return False
    # mallopt returns 1 on success.
    _applied = bool(libc.mallopt(M_MMAP_MAX, 0)) & bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied

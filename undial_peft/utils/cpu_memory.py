"""Return freed tensor buffers to the operating system on CPU, so a step's peak RSS is its tensors.

torch's CPU allocator takes every buffer from glibc's malloc. glibc maps blocks above its mmap
threshold (128 KiB at start) with ``mmap`` and unmaps them on ``free``, but each time such a
block is freed it raises the threshold to that block's size, up to 32 MiB. After the first few
freed activations, buffers of a few MiB (a layer's activations at batch 4 x 128) come from the
heap instead, and once freed they stay there, fragmented between live ones and still counted in
RSS: at the SmolLM2-360M shape that slack was ~0.8 GB of a 2.5 GB training step. Setting the
threshold explicitly switches the adjustment off (``mallopt(3)``), so freed buffers go back.

>>> pin_mmap_threshold(128 * 1024)  # doctest: +SKIP
True
"""

from __future__ import annotations

import contextlib
import ctypes
import functools

M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's <malloc.h>
GLIBC_START_THRESHOLD = 128 * 1024  # glibc's own initial threshold, which it would otherwise raise


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """glibc's C library, or None on another libc (musl, macOS, Windows), where nothing is changed."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  (only glibc has it: raises AttributeError elsewhere)
        return libc
    return None


def pin_mmap_threshold(threshold: int) -> bool:
    """Serve every allocation of at least ``threshold`` bytes by mmap, for the rest of the process.

    Process-wide and not undone: glibc has no call that switches its adjustment back on. Returns
    whether glibc accepted it (False on another C library or a threshold glibc refuses, > 32 MiB).
    """
    libc = _glibc()
    return libc is not None and libc.mallopt(M_MMAP_THRESHOLD, int(threshold)) == 1

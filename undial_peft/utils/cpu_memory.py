"""Return freed tensor buffers to the operating system on CPU, so a step's peak RSS is its tensors.

Two ways, both process-wide. The CLI's default relaunches the process under tcmalloc
(`relaunch_under`, ``LD_PRELOAD``), which keeps no such slack at about the same speed; a process that is
already running (a notebook) can only pin glibc's threshold (`pin_mmap_threshold`), which costs
page faults. docs/cost.md has the side-by-side figures.

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
import ctypes.util
import functools
import os
import sys
from collections.abc import Mapping, Sequence

from undial_peft.errors import UndialConfigError

M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's <malloc.h>


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


# Allocators a process can be relaunched under, each with the names `ctypes.util.find_library` knows it by
# (Debian / Ubuntu packages: libtcmalloc-minimal4, libjemalloc2). "auto" takes tcmalloc only: jemalloc
# freed as much, but its SmolLM2-135M steps were 7-10% slower where tcmalloc's were 7% faster (docs/cost.md).
PRELOADS: dict[str, tuple[str, ...]] = {"tcmalloc": ("tcmalloc_minimal", "tcmalloc"), "jemalloc": ("jemalloc",)}
ALLOCATORS = ("auto", *PRELOADS, "system")
RELAUNCHED = "UNDIAL_PEFT_ALLOCATOR"  # set in a relaunched process, so it is never relaunched again
_PACKAGES = {"tcmalloc": "libtcmalloc-minimal4", "jemalloc": "libjemalloc2"}


def allocator_environment(choice: str, environ: Mapping[str, str]) -> dict[str, str] | None:
    """The environment to relaunch this process in under ``choice``'s allocator, or None to go on as is.

    None for "system", outside Linux, in a process that was relaunched already or preloads the
    allocator itself, and for "auto" where tcmalloc is not installed. A named allocator that is not
    installed is an error naming the package.

    >>> allocator_environment("system", {})
    >>> env = allocator_environment("tcmalloc", {"LD_PRELOAD": "libfoo.so"})  # doctest: +SKIP
    >>> env["LD_PRELOAD"]  # doctest: +SKIP
    'libtcmalloc_minimal.so.4 libfoo.so'
    """
    if choice not in ALLOCATORS:
        raise UndialConfigError(f"allocator {choice!r}: use one of {', '.join(ALLOCATORS)}.")
    if choice == "system" or not sys.platform.startswith("linux") or environ.get(RELAUNCHED):
        return None
    name = "tcmalloc" if choice == "auto" else choice
    preload = environ.get("LD_PRELOAD", "")
    if any(lib in preload for lib in PRELOADS[name]):
        return None
    found = next(filter(None, map(ctypes.util.find_library, PRELOADS[name])), None)
    if found is None:
        if choice == "auto":
            return None
        raise UndialConfigError(f"--allocator {name}: its library is not installed (Debian / Ubuntu: apt install "
                                f"{_PACKAGES[name]}); or use --allocator system.")
    return {**environ, "LD_PRELOAD": " ".join(filter(None, [found, preload])), RELAUNCHED: name}


def relaunch_under(choice: str, argv: Sequence[str] | None = None) -> None:
    """Replace this process with the same command under ``choice``'s allocator (`allocator_environment`).

    Returns only where nothing changes. Call it before any work: the process starts again from its
    first line. ``argv``: the interpreter's arguments to run again (default ``sys.orig_argv[1:]``,
    e.g. ``["-m", "undial_peft.cli", "forget", ...]`` or the console script's path and its arguments).

    >>> relaunch_under("system")  # returns: nothing to change
    """
    env = allocator_environment(choice, os.environ)
    if env is not None:
        os.execve(sys.executable, [sys.executable, *(sys.orig_argv[1:] if argv is None else argv)], env)

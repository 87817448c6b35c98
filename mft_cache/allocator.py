"""How much a CPU process keeps of the memory it frees: `--cpu-allocator lean`.

glibc's malloc serves a large block from its own heap rather than from a fresh mapping once a block of that size
has been freed (its mmap threshold rises, up to 32 MiB), and a heap keeps what is freed in its middle. A training
step allocates and frees the same activations again and again, so the process's resident memory grows well past
the tensors alive at any moment: measured 1.6-2.3x `mft train --plan`'s estimate with LoRA and activation
checkpointing at 2,048 tokens. Fixing the threshold at 1 MiB maps every larger block afresh and unmaps it when it
is freed, so resident memory follows the live tensors, at the price of the page faults of each new mapping (about
20-25% more time per step on the demo). The environment variable MALLOC_MMAP_THRESHOLD_ does the same from outside.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

log = logging.getLogger(__name__)

ALLOCATORS = ("default", "lean")
LEAN_MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # malloc.h
ENV = "MALLOC_MMAP_THRESHOLD_"


def use_lean_allocator(threshold: int = LEAN_MMAP_THRESHOLD) -> bool:
    """Make this process's glibc malloc return every freed block above `threshold` bytes to the system. True when
    it took effect (or MALLOC_MMAP_THRESHOLD_ already fixes the threshold); False, with a warning, off glibc."""
    if os.environ.get(ENV):
        log.info("--cpu-allocator lean: %s=%s is already set; leaving it", ENV, os.environ[ENV])
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        log.warning("--cpu-allocator lean needs glibc (Linux); this C library keeps its own policy")
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)) != 1:
        log.warning("--cpu-allocator lean: mallopt(M_MMAP_THRESHOLD, %d) was refused", threshold)
        return False
    return True

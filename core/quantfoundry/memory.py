"""Giving freed memory back to the operating system."""

from __future__ import annotations

import ctypes
import sys


def trim_memory() -> None:
    """Ask glibc to return freed heap memory (large tensors freed in a loop otherwise keep the
    process's resident size at its high-water mark). A no-op elsewhere."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass

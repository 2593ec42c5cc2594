"""quantfoundry.memory against glibc's own accounting (mallinfo2), in fresh processes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator only")

PROBE = r"""
import ctypes, sys, torch
from quantfoundry.memory import mmap_large_allocations

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
applied = mmap_large_allocations() if sys.argv[1] == "set" else None
a = torch.empty(4 << 20, dtype=torch.uint8)  # mapped (above glibc's 128 KiB start) ...
del a                                        # ... and freed: glibc raises its threshold to 4 MiB
before = libc.mallinfo2().hblkhd             # bytes in mapped blocks
b = torch.empty(4 << 20, dtype=torch.uint8)
print(applied, libc.mallinfo2().hblkhd - before)
"""


def probe(mode: str, **env: str) -> tuple[str, int]:
    environ = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"} | env
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True,
                         text=True, check=True, env=environ).stdout.split()
    return out[0], int(out[1])


def test_a_freed_tensor_no_longer_moves_later_ones_into_the_heap() -> None:
    applied, mapped = probe("leave")
    assert mapped == 0  # glibc's dynamic threshold: the second 4 MiB tensor came from the heap
    applied, mapped = probe("set")
    assert applied == "True" and mapped >= 4 << 20  # its own mapping, unmapped when freed


def test_a_process_that_set_the_threshold_keeps_its_own() -> None:
    applied, mapped = probe("set", MALLOC_MMAP_THRESHOLD_=str(64 << 20))
    assert applied == "False" and mapped == 0  # 64 MiB: the 4 MiB tensor stays in the heap


def test_the_qf_command_sets_it() -> None:
    code = ("import ctypes, unittest.mock as m, quantfoundry.cli as c\n"
            "with m.patch.object(c, 'cli', lambda: None), m.patch.object(c, 'mmap_large_allocations') as f:\n"
            "    c.main()\n"
            "print(f.call_count)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "1"

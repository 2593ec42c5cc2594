"""The kernel kit for ``triton-w4a16`` on CPU tensors, run by ``test_wa16.py`` in a subprocess
with ``TRITON_INTERPRET=1`` (Triton's interpreter). Not collected on its own (no ``test_``)."""

from __future__ import annotations

from typing import ClassVar

import torch
from quantfoundry.testing.conformance import KernelConformance


class TestTritonWA16Interpreted(KernelConformance):
    kernel = "triton-w4a16"
    devices = ("cpu",)
    # sym/asym, groups 32-128, per channel, float16 zero points, 8 bits; the last shape is not a
    # multiple of 16 columns (dequantized instead)
    specs = ("int4-g128", "int4-g32-sym", "int4", "int4-g64-zf16", "int8-g64", "int8")
    shapes: ClassVar[tuple[tuple[int, int], ...]] = ((96, 256), (40, 512), (24, 200))
    dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float32, torch.bfloat16, torch.float16)


def test_every_gemv_against_float64() -> None:
    check_every_gemv(torch.device("cpu"), interpreting=True)


def check_every_gemv(dev: torch.device, *, interpreting: bool) -> None:
    """Each GEMV (``fma``, ``h2``, ``dot``, ``dot_t`` — the dispatch picks ``h2`` and ``dot_t``
    only where a device's tuned table says so, so the kit alone would not run them here) on 4- and
    8-bit codes (8 bits in bfloat16: the tensor-core GEMVs' float32 decode; else their 16-bit
    one), with asymmetric, symmetric and (``fma``) fractional zero points, with and without bias
    and a split of the input dimension, against the float64 product within the kit's bound.
    ``h2`` (one row, 4 bits) also with chains of two words, prefetching, and inputs of 1e-3 and
    3000 (float16: the sums stay finite and within the bound). In Triton's interpreter ``h2``
    runs its float32 emulation of the paired 16-bit instructions."""
    from qf_triton.gemv import GemvConfig, gemv
    from qf_triton.wa16 import repack
    from quantfoundry.testing.conformance import KERNEL_TOLERANCE

    g = torch.Generator().manual_seed(0)
    n, k = 96, 512
    for bits in (4, 8):
        top = 1 << bits
        codes = torch.randint(0, top, (n, k), generator=g, dtype=torch.uint8)
        s = (torch.rand(n, k // 128, generator=g) * 0.01 + 1e-3).half()
        zeros = {"asym": torch.randint(0, top, (n, k // 128), generator=g, dtype=torch.uint8), "sym": None,
                 "fractional": (torch.rand(n, k // 128, generator=g) * (top - 1)).half()}
        for zname, z in zeros.items():
            p = repack(codes.to(dev), s.to(dev), None if z is None else z.to(dev), bits, 128,
                       int_zero=zname != "fractional")
            zf = torch.full_like(s, top / 2, dtype=torch.float32) if z is None else z.float()
            w = ((codes.double().view(n, -1, 128) - zf.double()[..., None]) * s.double()[..., None]).view(n, k)
            w = w.to(dev)
            cases = []
            for kind in ("fma", "h2", "dot", "dot_t"):
                if (kind != "fma" and zname == "fractional") or (kind == "h2" and bits == 8):
                    continue
                bk = 128 if kind in ("fma", "h2") or bits == 4 else 64  # 16 rows of words
                rows = {"fma": (1, 3), "h2": (1,)}.get(kind, (1, 5, 16))
                dtypes = (torch.float32, torch.bfloat16) if kind == "fma" else (torch.float16, torch.bfloat16)
                variants = ((1, False), (2, True)) if kind == "h2" else ((1, False),)
                scales = (1.0, 1e-3, 3000.0) if kind == "h2" else (1.0,)
                cases += [(GemvConfig(kind, 32 if kind == "h2" else 64, bk, split, 4, 2, chain, prefetch), m, dtype,
                           scale) for m in rows for dtype in dtypes for split in (1, 2)
                          for chain, prefetch in variants for scale in scales]
            for cfg, m, dtype, scale in cases:
                x = (torch.randn(m, k, generator=g) * scale).to(dev, dtype)
                for b in (None, torch.randn(n, generator=g).to(dev, dtype)):
                    y = gemv(x, p, b, cfg, interpreting=interpreting)
                    exact = x.double() @ w.T + (0 if b is None else b.double())
                    mag = x.double().abs() @ w.abs().T + (0 if b is None else b.double().abs())
                    err = (y.double() - exact).abs()
                    ok = bool((err <= KERNEL_TOLERANCE[dtype] * mag + 1e-6).all())
                    assert ok, (bits, zname, cfg, m, dtype, scale, b is None)

"""``triton-w4a16``: the kernel kit (every served grid, several shapes, float32/bf16/fp16
inputs, 1–33 rows, float64 error bound, NaN-poisoned memory) — on CPU CI through Triton's
interpreter (``interpreted_kit.py`` in a subprocess with ``TRITON_INTERPRET=1``), compiled on a
CUDA device; the repacked words against an independent unpacking; and the dispatch by token
count."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import quantfoundry as qf
import torch
from quantfoundry.pipeline.components import make
from quantfoundry.testing import assert_passes_in_triton_interpreter
from quantfoundry.testing.conformance import KernelConformance

HERE = Path(__file__).resolve().parent


def test_the_kit_passes_in_tritons_interpreter() -> None:
    assert_passes_in_triton_interpreter(HERE / "interpreted_kit.py")


class TestTritonWA16(KernelConformance):
    """The same kit, compiled, on the GPU machine."""

    kernel = "triton-w4a16"
    devices = ("cuda",)
    specs = ("int4-g128", "int4-g32-sym", "int4", "int4-g64-zf16", "int8-g64", "int8")
    shapes: ClassVar[tuple[tuple[int, int], ...]] = ((96, 256), (40, 512), (24, 200), (4096, 4096))
    dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float32, torch.bfloat16, torch.float16)


def test_repacked_words_hold_the_codes() -> None:
    from qf_triton.wa16 import repack

    g = torch.Generator().manual_seed(0)
    for bits in (4, 8):
        codes = torch.randint(0, 1 << bits, (24, 64), generator=g, dtype=torch.uint8)
        p = repack(codes, torch.rand(24, 2, generator=g), torch.rand(24, 2, generator=g), bits, 32)
        per = 32 // bits
        assert p.words.dtype == torch.int32 and p.block == 24 and p.words.shape == (1, 64 // per, 24)
        words = p.word_matrix().to(torch.int64) & 0xFFFFFFFF
        for k in range(64):  # code k of column n: word k // per, bits (k % per) * bits
            got = (words[k // per] >> ((k % per) * bits)) & ((1 << bits) - 1)
            assert torch.equal(got, codes[:, k].to(torch.int64)), (bits, k)
        assert p.scale.shape == (2, 24) and p.scale.dtype == torch.float32  # the storage dtype, kept
        assert p.zero.dtype == torch.float16 and not p.sym
    # 512 columns: blocks of 256, each contiguous over the input dimension
    codes = torch.randint(0, 16, (512, 64), generator=g, dtype=torch.uint8)
    p = repack(codes, torch.rand(512, 1, generator=g), None, 4, 64)
    assert p.block == 256 and p.words.shape == (2, 8, 256) and p.sym
    got = (p.words[1, 3, 5].item() & 0xFFFFFFFF) >> 4 * 2 & 0xF  # column 256 + 5, code 8·3 + 2
    assert got == codes[261, 26].item()


def test_serves_and_hands_large_calls_on() -> None:
    kernel = make("kernel", "triton-w4a16", {"max_tokens": "64"})
    cuda = torch.device("cuda")
    fmt = qf.resolve_format("int4-g128")
    assert kernel.serves(qf.resolve_format("int3-g128"), cuda) is not None
    assert kernel.serves(qf.resolve_format("int4-g8"), cuda) is not None  # groups under 16 columns
    assert "CUDA" in kernel.serves(fmt, torch.device("cpu"))
    assert kernel.serves(fmt, cuda, tokens=64) is None
    assert "above 64 tokens" in kernel.serves(fmt, cuda, tokens=65)


def test_rows_pick_the_gemv_or_the_tiled_kernel() -> None:
    """1-16 rows of 16-bit inputs: the tensor-core GEMV (weight first, untuned) where a step of
    128 codes stays in a group and zero points are integers; else 1-4 rows: the CUDA-core GEMV;
    else the tiled kernel. Splits cut the input into whole steps, as near the tuned programs
    per SM as powers of two come."""
    from qf_triton.configs import pick, split_for
    from qf_triton.gemv import GemvConfig
    from qf_triton.wa16 import Config, repack

    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (256, 1024), generator=g, dtype=torch.uint8)

    def packed(group: int, int_zero: bool = True):
        s = torch.rand(256, 1024 // group, generator=g).half()
        return repack(codes, s, torch.zeros_like(s, dtype=torch.uint8), 4, group, int_zero=int_zero)

    p = packed(128)
    for m in (1, 3, 4):
        cfg = pick(m, p, 132, torch.float32, "no such device")
        assert isinstance(cfg, GemvConfig) and cfg.kind == "fma", (m, cfg)
        assert 1024 % (cfg.split * cfg.bk) == 0 and cfg.bk <= 128
        assert pick(m, packed(32), 132, torch.float16, "no such device").kind == "fma"
    for m in (1, 5, 16):
        cfg = pick(m, p, 132, torch.bfloat16, "no such device")
        assert isinstance(cfg, GemvConfig) and cfg.kind == "dot_t" and cfg.bk == 128, (m, cfg)
        assert 1024 % (cfg.split * cfg.bk) == 0
    assert isinstance(pick(8, p, 132, torch.float32, "no such device"), Config)
    assert isinstance(pick(17, p, 132, torch.float16, "no such device"), Config)
    assert isinstance(pick(8, packed(32), 132, torch.float16, "no such device"), Config)  # a step spans groups
    assert isinstance(pick(8, packed(128, int_zero=False), 132, torch.float16, "no such device"), Config)
    assert pick(1, packed(32), 132, torch.float16, "no such device").bk == 32
    # 448 output tiles at ~4.7 programs per SM: 1.4 slices wanted, 1 is nearer in ratio than 2;
    # 64 tiles at 1.7: 3.5 wanted, 4; a split must leave whole steps (64 steps: at most 16 here)
    assert split_for(448, 64, 4.674, 132) == 1
    assert split_for(64, 64, 1.697, 132) == 4
    assert split_for(8, 64, 4.0, 132) == 16
    assert split_for(8, 6, 4.0, 132) == 2


def test_one_row_runs_h2_where_the_tuned_table_measured_it_faster(monkeypatch) -> None:
    """``h2`` serves one row of 16-bit inputs on 4-bit codes with integer zero points; the
    dispatch takes it only on a device whose table has it ahead of ``dot_t`` for that shape
    class, with the table's chain, prefetch and split (as programs per SM) — or for that exact
    shape, with its own tile and split."""
    from qf_triton import configs
    from qf_triton.gemv import GemvConfig
    from qf_triton.wa16 import repack

    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (4096, 4096), generator=g, dtype=torch.uint8)
    s = torch.rand(4096, 32, generator=g).half()
    p = repack(codes, s, torch.zeros_like(s, dtype=torch.uint8), 4, 128)
    h2 = {"bn": 256, "bk": 128, "warps": 4, "stages": 1, "chain": 2, "prefetch": True, "waves": 2.0, "vs_cublas": 1.5}
    dot_t = {"bn": 128, "bk": 128, "warps": 8, "stages": 3, "waves": 2.0, "vs_cublas": 1.3}
    table = {"fast-h2": {"h2|1|m|m|4": h2, "dot_t|1|m|m|4": dot_t},
             "slow-h2": {"h2|1|m|m|4": {**h2, "vs_cublas": 1.2}, "dot_t|1|m|m|4": dot_t}}
    monkeypatch.setattr(configs, "_tuned", lambda: table)
    cfg = configs.pick(1, p, 132, torch.float16, "fast-h2")
    # 16 tiles of 256 columns at 2 programs per SM: 16.5 slices wanted, 16 the largest power of two
    assert cfg == GemvConfig("h2", 256, 128, 16, 4, 1, 2, True)
    assert configs.pick(1, p, 132, torch.bfloat16, "fast-h2").kind == "h2"
    assert configs.pick(2, p, 132, torch.float16, "fast-h2").kind == "dot_t"  # one row only
    assert configs.pick(1, p, 132, torch.float32, "fast-h2").kind == "fma"  # 16-bit inputs only
    assert configs.pick(1, p, 132, torch.float16, "slow-h2").kind == "dot_t"
    assert configs.pick(1, p, 132, torch.float16, "untuned").kind == "dot_t"
    # an exact shape's own entry (tile and split) comes before its class's
    table["fast-h2"]["h2|1|4096x4096|4"] = {"bn": 64, "bk": 128, "warps": 2, "stages": 1, "chain": 1,
                                            "prefetch": False, "split": 4, "vs_cublas": 1.6}
    assert configs.pick(1, p, 132, torch.float16, "fast-h2") == GemvConfig("h2", 64, 128, 4, 2, 1, 1, False)
    table["slow-h2"]["dot_t|1|4096x4096|4"] = {"bn": 64, "bk": 128, "warps": 4, "stages": 3, "split": 2,
                                               "vs_cublas": 1.4}
    assert configs.pick(1, p, 132, torch.float16, "slow-h2") == GemvConfig("dot_t", 64, 128, 2, 4, 3)
    p8 = repack(codes, s, torch.zeros_like(s, dtype=torch.uint8), 8, 128)
    assert configs.pick(1, p8, 132, torch.float16, "fast-h2").kind != "h2"  # 4-bit codes only
    pf = repack(codes, s, s, 4, 128, int_zero=False)
    assert configs.pick(1, pf, 132, torch.float16, "fast-h2").kind != "h2"  # integer zero points only


def test_every_gemv_compiled_on_cuda() -> None:
    """The interpreter kit's GEMV check, compiled: ``h2``'s inline PTX itself (the interpreter
    runs its emulation)."""
    import pytest

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (the same check runs in Triton's interpreter on CPU)")
    import sys

    sys.path.insert(0, str(HERE))
    try:
        from interpreted_kit import check_every_gemv
    finally:
        sys.path.remove(str(HERE))
    check_every_gemv(torch.device("cuda"), interpreting=False)

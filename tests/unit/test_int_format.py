"""The int format against a float64 reference written here from the documented formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import quantfoundry as qf
import torch
from quantfoundry.toolkit import IntFormat, IntOptions, pack_bits, unpack_bits


def reference(w: np.ndarray, bits: int, group: int, sym: bool) -> tuple[np.ndarray, np.ndarray]:
    """float64 quantize-dequantize per the documented grid (scale stored as float16)."""
    rows, cols = w.shape
    g = group or cols
    maxq = 2**bits - 1
    q = np.zeros_like(w)
    deq = np.zeros_like(w)
    for r in range(rows):
        for start in range(0, cols, g):
            x = w[r, start:start + g].astype(np.float64)
            xmin, xmax = min(x.min(), 0.0), max(x.max(), 0.0)
            if sym:
                scale = 2 * max(-xmin, xmax) / maxq
            else:
                scale = (xmax - xmin) / maxq
            scale = 1.0 if scale == 0 else scale
            scale = float(np.float16(scale))
            zero = 2 ** (bits - 1) if sym else float(np.clip(np.round(-xmin / scale), 0, maxq))
            codes = np.clip(np.round(x / scale) + zero, 0, maxq)
            q[r, start:start + g] = codes
            deq[r, start:start + g] = (codes - zero) * scale
    return q, deq


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("group", [0, 32, 128])
@pytest.mark.parametrize("sym", [False, True])
def test_quantize_matches_float64_reference(bits: int, group: int, sym: bool) -> None:
    gen = torch.Generator().manual_seed(bits * 100 + group + sym)
    w = torch.randn(24, 256, generator=gen) * 0.05
    w[3, :40] = 0.0  # an all-zero group
    w[5] += 0.02  # a shifted row (one-signed groups)
    fmt = IntFormat(IntOptions(bits=bits, group_size=group, sym=sym))
    qw = fmt.quantize(w)
    q_ref, deq_ref = reference(w.double().numpy(), bits, group, sym)
    codes = qw.codes().numpy()
    mismatched = int((codes != q_ref).sum())
    # float32 division vs float64 can flip a code that sits exactly on a rounding boundary
    assert mismatched <= 2, f"{mismatched} codes differ from the float64 reference"
    same = codes == q_ref
    np.testing.assert_allclose(qw.dequantize().double().numpy()[same], deq_ref[same], rtol=0, atol=1e-7)
    err = np.abs(qw.dequantize().double().numpy() - w.double().numpy())
    g = group or 256
    scales = qw.params["scale"].double().numpy().repeat(g, axis=1)
    assert (err <= scales * 1.001 + 1e-7).all(), "an error above one grid step"


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8, 16])
def test_bit_packing_roundtrip_and_layout(bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    n = 1003
    codes = torch.randint(0, 2**bits, (n,), generator=gen)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == math.ceil(n * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, n), codes)
    # layout: little-endian bitstream, value i at bits [i*bits, (i+1)*bits)
    stream = "".join(format(int(b), "08b")[::-1] for b in packed.tolist())
    ref = [int(stream[i * bits:(i + 1) * bits][::-1], 2) for i in range(n)]
    assert ref == codes.tolist()


def test_spec_syntax_roundtrip() -> None:
    for spec, opts in {
        "int4-g128": IntOptions(bits=4, group_size=128),
        "int8": IntOptions(bits=8, group_size=0),
        "int3-g64-sym": IntOptions(bits=3, group_size=64, sym=True),
        "int4-g32-sf32": IntOptions(bits=4, group_size=32, scale_dtype="float32"),
    }.items():
        fmt = qf.resolve_format(spec)
        assert fmt.options == opts
        assert fmt.spec == spec
    assert qf.resolve_format("int", {"bits": "3", "group_size": "64"}).spec == "int3-g64"
    assert qf.resolve_format("int4-g128", {"sym": "true"}).spec == "int4-g128-sym"


def test_bits_per_weight_is_derived_from_storage() -> None:
    fmt = qf.resolve_format("int4-g128")
    # 4 bits + (fp16 scale + uint8 zero) per 128 weights
    assert fmt.bits_per_weight((4096, 4096)) == pytest.approx(4 + 24 / 128)
    assert qf.resolve_format("int3-g64-sym").bits_per_weight((64, 256)) == pytest.approx(3 + 16 / 64)
    w = torch.randn(64, 256)
    qw = fmt.quantize(w)
    assert qw.nbytes() == fmt.nbytes((64, 256))


@pytest.mark.parametrize(
    ("spec", "width", "expected"),
    [("int4-g128", 576, "int4-g64"), ("int4-g128", 172, "int4"), ("int4-g128", 64, "int4-g64"),
     ("int4-g32", 96, "int4-g32"), ("int3-g128-sym", 160, "int3-g32-sym")],
)
def test_width_fallback_rule(spec: str, width: int, expected: str) -> None:
    fmt = qf.resolve_format(spec)
    if fmt.check_shape((8, width)) is None:
        assert fmt.spec == expected
        return
    fallback = fmt.fallback((8, width))
    assert fallback is not None and fallback.spec == expected
    assert fallback.check_shape((8, width)) is None


def test_column_slices_match_whole_tensor_rounding() -> None:
    """GPTQ-style use: fit once per group, round one column at a time with col0 offsets."""
    fmt = qf.resolve_format("int4-g32")
    w = torch.randn(16, 128)
    params = fmt.fit(w)
    whole = fmt.round(w, params)
    cols = torch.cat([fmt.round(w[:, j:j + 1], params, col0=j) for j in range(128)], dim=1)
    assert torch.equal(whole, cols)
    g1 = {k: v[:, 1:2] for k, v in params.items()}
    assert torch.equal(fmt.round(w[:, 40:45], g1, col0=8), whole[:, 40:45])


def test_bad_specs_are_clear() -> None:
    with pytest.raises(qf.QFError, match="bits must be between 1 and 8, got 9"):
        qf.resolve_format("int9")
    with pytest.raises(qf.QFError, match="unknown format 'nf5'"):
        qf.resolve_format("nf5")


def test_one_bit_grids_follow_the_float64_formula() -> None:
    """``int1`` (asymmetric only; HQQ's 1-bit setting): two levels a group, codes packed eight a
    byte; with an integer zero point the levels are ``{0, scale}`` or ``{-scale, 0}``, with a
    float16 one the group's own ``{min, max}``."""
    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(0)).double()
    for spec in ("int1-g64", "int1-g64-zf16"):
        fmt = qf.resolve_format(spec)
        qw = fmt.quantize(w.float())
        assert qw.packed.numel() == 8 * 128 // 8
        s = qw.params["scale"].double().repeat_interleave(64, 1)
        z = qw.params["zero"].double().repeat_interleave(64, 1)
        q = torch.clamp(torch.round(w / s + z) if spec.endswith("zf16") else torch.round(w / s) + z, 0, 1)
        torch.testing.assert_close(qw.dequantize(torch.float64), (q - z) * s, rtol=1e-6, atol=1e-6)
    with pytest.raises(qf.QFError, match="symmetric 1-bit"):
        qf.resolve_format("int1-g64-sym")

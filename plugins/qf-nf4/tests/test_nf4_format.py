"""``nf4`` / ``fp4`` against bitsandbytes itself: the same packed bytes and absmax as
``bitsandbytes.functional.quantize_4bit`` for every block (edge cases included), with and
without double quantization, the same dequantized values, and codes that are a nearest table
entry in float64; the format conformance kit on double quantization with chunks across rows."""

from __future__ import annotations

# the oracle: bitsandbytes itself (a testing dependency, qf-nf4[testing]: missing, the tests fail, never skip)
import bitsandbytes.functional as bnb_functional
import pytest
import quantfoundry as qf
import torch
from quantfoundry.testing.conformance import FormatConformance


def trained_like(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w.view(-1)[torch.randint(0, w.numel(), (max(1, w.numel() // 100),), generator=g)] *= 20
    return w


def edge_cases(cols: int, block: int, kind: str) -> torch.Tensor:
    """One row per case: zeros, a constant, ±absmax, values on every midpoint of the table
    (ties), subnormal and tiny scales, negative zeros, one outlier."""
    table = qf.get_component("format", kind)
    from qf_nf4.formats import code_table

    t = code_table(kind).sort().values
    mids = ((t[:-1] + t[1:]) / 2).repeat(cols // 15 + 1)[:cols]
    rows = [
        torch.zeros(cols),
        torch.full((cols,), 0.37),
        torch.tensor([1.0, -1.0] * (cols // 2)),
        mids * 3.0,                                     # exactly on the midpoints, times an absmax of 3
        torch.linspace(-1, 1, cols) * 1e-40,            # subnormal values
        torch.linspace(-1, 1, cols) * 1e-30,
        -torch.zeros(cols),
        torch.cat([torch.full((cols - 1,), 1e-3), torch.tensor([50.0])]),
    ]
    assert table is not None
    w = torch.stack(rows)
    w[3, ::block] = 3.0  # every block of the midpoint row has absmax 3
    return w


def bnb_quantize(w: torch.Tensor, kind: str, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    packed, state = bnb_functional.quantize_4bit(w, blocksize=block, quant_type=kind)
    return packed.reshape(-1), state.absmax


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
@pytest.mark.parametrize("block", [64, 128, 256, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bytes_and_absmax_equal_bitsandbytes(kind: str, block: int, dtype: torch.dtype) -> None:
    fmt = qf.resolve_format(kind if block == 64 else f"{kind}-b{block}")
    cols = max(block, 512)
    w = torch.cat([trained_like(24, cols, seed=block), edge_cases(cols, block, kind)]).to(dtype)
    ours = fmt.quantize(w)
    packed, absmax = bnb_quantize(w, kind, block)
    assert torch.equal(ours.packed, packed)
    assert torch.equal(ours.params["absmax"].reshape(-1), absmax)
    want = bnb_functional.dequantize_4bit(packed.unsqueeze(1), bnb_functional.QuantState(
        absmax=absmax, shape=w.shape, dtype=torch.float32, blocksize=block, quant_type=kind,
        code=bnb_functional.get_4bit_type(kind, device="cpu")))
    assert torch.equal(ours.dequantize(), want)


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_codes_are_a_nearest_table_entry_in_float64(kind: str) -> None:
    from qf_nf4.formats import code_table

    fmt = qf.resolve_format(kind)
    w = trained_like(16, 256, seed=3)
    qw = fmt.quantize(w)
    table = code_table(kind).double()
    absmax = w.double().view(16, 4, 64).abs().amax(-1).repeat_interleave(64, dim=1)
    scaled = w.double() / absmax
    dist = (scaled.unsqueeze(-1) - table).abs()
    chosen = dist.gather(-1, qw.codes().long().unsqueeze(-1)).squeeze(-1)
    assert torch.all(chosen <= dist.min(-1).values + 1e-6)
    torch.testing.assert_close(qw.dequantize(torch.float64), table[qw.codes().long()] * absmax, rtol=1e-6, atol=0)


def test_sizes_specs_and_shapes() -> None:
    nf4 = qf.resolve_format("nf4")
    assert nf4.spec == "nf4" and qf.resolve_format("nf4-b128").spec == "nf4-b128"
    assert nf4.bits_per_weight((4096, 4096)) == 4 + 32 / 64  # a float32 absmax per 64 values
    assert qf.resolve_format("fp4-b256").bits_per_weight((64, 1024)) == 4 + 32 / 256
    assert nf4.check_shape((8, 600)) == "600 columns are not a multiple of the group size 64"
    with pytest.raises(qf.QFError, match="blocksize must be a power of two from 64 to 4096"):
        qf.resolve_format("nf4-b96")


@pytest.mark.parametrize(("spec", "block"), [("nf4-dq", 64), ("fp4-dq", 64), ("nf4-b128-dq", 128), ("nf4-b4096-dq", 4096)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_double_quant_equals_bitsandbytes_compress_statistics(spec: str, block: int, dtype: torch.dtype) -> None:
    """Every stored tensor of ``quantize_4bit(..., compress_statistics=True)``: the packed codes,
    the 8-bit absmax codes, the nested absmax (chunks of 256 blocks running across rows: 8 blocks
    a row here), the offset, the map — and bitsandbytes' dequantization of them is ours."""
    fmt = qf.resolve_format(spec)
    kind = spec[:3]
    cols = max(block, 512)
    # 24 + 8 + 3 rows: the last chunk of 256 absmax values is short
    w = torch.cat([trained_like(24, cols, seed=block), edge_cases(cols, block, kind),
                   trained_like(3, cols, seed=7) * 40]).to(dtype)
    ours = fmt.quantize(w)
    packed, state = bnb_functional.quantize_4bit(w, blocksize=block, quant_type=kind, compress_statistics=True)
    assert torch.equal(ours.packed, packed.reshape(-1))
    assert ours.params["absmax"].dtype == torch.uint8
    assert torch.equal(ours.params["absmax"].reshape(-1), state.absmax)
    tp = ours.tensor_params
    assert torch.equal(tp["nested_absmax"], state.state2.absmax)
    assert torch.equal(tp["offset"], state.offset.reshape(1))
    assert torch.equal(tp["nested_map"], state.state2.code)
    state.dtype = torch.float32  # dequantize in float32, as ours (bitsandbytes would round to the input's dtype)
    assert torch.equal(ours.dequantize(), bnb_functional.dequantize_4bit(packed, state))


@pytest.mark.parametrize("w", [torch.zeros(4, 256), torch.full((4, 256), -0.25), torch.ones(2, 128) * 1e-39],
                         ids=["zeros", "constant", "subnormal"])
def test_double_quant_of_degenerate_tensors_equals_bitsandbytes(w: torch.Tensor) -> None:
    """Every absmax equal: the absmax minus its mean is zero everywhere and each chunk's scale 0."""
    ours = qf.resolve_format("nf4-dq").quantize(w)
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(ours.packed, packed.reshape(-1))
    assert torch.equal(ours.params["absmax"].reshape(-1), state.absmax)
    assert torch.equal(ours.tensor_params["nested_absmax"], state.state2.absmax)
    assert torch.equal(ours.dequantize(), bnb_functional.dequantize_4bit(packed, state).float())


def test_the_absmax_codes_are_within_one_lookup_step_of_nearest() -> None:
    """An independent float64 check of the nested rounding: each absmax code's map entry is at
    most one step of bitsandbytes' 65,536-step lookup table (2 / 65535) worse than the nearest."""
    from qf_nf4.formats import dynamic_map

    w = trained_like(64, 1024, seed=11) * torch.linspace(0.1, 3, 64).unsqueeze(1)
    qw = qf.resolve_format("nf4-dq").quantize(w)
    absmax = w.double().view(-1, 64).abs().amax(-1)
    a = absmax - absmax.mean()
    scale = a.abs().view(-1, 256).amax(-1).repeat_interleave(256)
    normed = a / scale
    dmap = dynamic_map().double()
    dist = (normed.unsqueeze(-1) - dmap).abs()
    chosen = dist.gather(-1, qw.params["absmax"].reshape(-1, 1).long()).squeeze(-1)
    assert torch.all(chosen <= dist.min(-1).values + 2 / 65535 + 1e-7)
    assert (chosen <= dist.min(-1).values + 1e-7).float().mean() > 0.99  # nearly always the nearest


def test_double_quant_sizes_and_specs() -> None:
    dq = qf.resolve_format("nf4-dq")
    assert dq.spec == "nf4-dq" and qf.resolve_format("fp4-b256-dq").spec == "fp4-b256-dq"
    shape = (4096, 4096)
    blocks = 4096 * 4096 // 64
    # codes, one uint8 per block, a float32 scale per 256 blocks, the offset and the 256-entry map
    assert dq.nbytes(shape) == 4096 * 4096 // 2 + blocks + 4 * blocks // 256 + 4 + 4 * 256
    assert round(dq.bits_per_weight(shape), 3) == 4.127  # bitsandbytes' figure for NF4 with double quant


def test_gptq_stores_the_per_tensor_parameters_it_rounded_with() -> None:
    """The LDLQ loop fits the per-tensor parameters of each weight in a segment (two stacked
    here, as GPTQ stacks q/k/v) before the columns, and what the stored weights decode to is
    exactly what the loop measured its errors against."""
    from quantfoundry.toolkit.ldlq import Segment, ldlq_solve

    fmt = qf.resolve_format("nf4-dq")
    a, b = trained_like(48, 256, seed=1), trained_like(16, 256, seed=2) * 5
    x = torch.randn(512, 256, generator=torch.Generator().manual_seed(3))
    res = ldlq_solve(torch.cat([a, b]), x.T @ x / 512, [Segment(0, 64, fmt, tensors=[48, 16])])
    assert len(res.tensor_params[0]) == 2
    for (r0, r1), w, tp in zip([(0, 48), (48, 64)], (a, b), res.tensor_params[0], strict=True):
        assert torch.equal(tp["offset"], fmt.fit_tensor(w)["offset"])  # fitted to the weight, before the loop
        qw = qf.QuantizedWeight(fmt, tuple(w.shape), torch.float32, fmt.pack(res.codes[0][r0:r1]),
                                {k: v[r0:r1] for k, v in res.params[0].items()}, tensor_params=tp)
        assert torch.equal(qw.dequantize(), res.values[r0:r1])
    rtn = torch.cat([fmt.quantize(a).dequantize(), fmt.quantize(b).dequantize()])
    assert not torch.equal(rtn, res.values)  # the loop moved codes


class TestNF4DoubleQuantConformance(FormatConformance):  # nf4, fp4: tests/conformance (the formats' examples)
    spec = "nf4-dq"
    shape = (40, 512)  # 320 blocks: chunks of 256 run across rows, the last one short

"""``nf4`` / ``fp4`` against bitsandbytes itself: the same packed bytes and absmax as
``bitsandbytes.functional.quantize_4bit`` for every block (edge cases included), the same
dequantized values, and codes that are a nearest table entry in float64."""

from __future__ import annotations

# the oracle: bitsandbytes itself (a testing dependency, qf-nf4[testing]: missing, the tests fail, never skip)
import bitsandbytes.functional as bnb_functional
import pytest
import quantfoundry as qf
import torch


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

"""ActQuant and the observers against float64 references written from the engines' formulas."""

from __future__ import annotations

import numpy as np
import pytest
import quantfoundry as qf
import torch
from fp8_reference import fp8_round
from quantfoundry.roles.activation import FP8_MIN_SCALE
from quantfoundry.toolkit import make_observer


def ref_fake_quant(x: np.ndarray, dtype: str, scale: np.ndarray | None) -> np.ndarray:
    """The engine's per-token (scale None) or static quantization, dequantized, written from
    vLLM's kernels (float32 scale arithmetic, then float64): int8 per token ``x · (127/max)``,
    int8 static ``x / s``, fp8 per token ``x / s`` (floor 1/(448·512)), fp8 static ``x · (1/s)``."""
    x32 = x.astype(np.float32)
    if scale is None:
        absmax = np.abs(x32).max(axis=-1, keepdims=True)
        if dtype == "int8":
            inv = np.where(absmax > 0, np.float32(127.0) / np.where(absmax > 0, absmax, 1), np.float32(0))
            y, scale = (x32 * inv).astype(np.float64), (absmax / np.float32(127.0)).astype(np.float64)
        else:
            scale = np.maximum(absmax / np.float32(448.0), np.float32(1.0 / (448.0 * 512.0)))
            y, scale = (x32 / scale).astype(np.float64), scale.astype(np.float64)
    else:
        s = np.asarray(scale, dtype=np.float32)
        y = (x32 / s if dtype == "int8" else x32 * (np.float32(1) / s)).astype(np.float64)
        scale = s.astype(np.float64)
    q = np.clip(np.round(y), -128, 127) if dtype == "int8" else fp8_round(y)  # np.round: half to even
    return q * scale


def f32(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32).astype(np.float64)


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_dynamic_per_token_fake_quant_follows_the_engine_formula(dtype: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, 96, generator=g) * torch.logspace(-3, 2, 96)  # channels of very different ranges
    x[0, 0] = 0  # an all-zero token
    x[1, 1, :4] = torch.tensor([1e-30, -1e-30, 0.0, 0.0])  # a token of tiny values: fp8's scale floor
    x[1, 1, 4:] = 0
    act = qf.ActQuant(dtype)
    got = act.fake_quant(x).double().numpy()
    want = ref_fake_quant(x.double().numpy(), dtype, None)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-30)
    assert np.all(got[0, 0] == 0)


def test_int8_ties_round_half_to_even_and_saturate() -> None:
    act = qf.ActQuant("int8", dynamic=False)
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -2.5, 127.5, 200.0, -300.0]])
    got = act.fake_quant(x, torch.tensor([1.0]))
    assert got.tolist() == [[0.0, 2.0, 2.0, -0.0, -2.0, 127.0, 127.0, -128.0]]


def test_fp8_static_codes_are_the_e4m3_nearest_values() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2000, generator=g) * 100
    x[:8] = torch.tensor([448.0, 464.0, 480.0, 1e6, -1e6, 0.0, 2.0 ** -9, 3 * 2.0 ** -10])  # ties, saturation, subnormals
    scale = torch.tensor([0.75])
    act = qf.ActQuant("fp8", dynamic=False)
    got = act.fake_quant(x, scale).double().numpy()
    want = ref_fake_quant(x.double().numpy(), "fp8", np.array([0.75]))
    np.testing.assert_array_equal(got, want)
    codes = act.quantize(x, scale)
    assert codes.dtype == torch.float8_e4m3fn and not torch.isnan(codes.float()).any()


def test_fp8_dynamic_scale_has_vllms_floor() -> None:
    act = qf.ActQuant("fp8")
    s = act.dynamic_scale(torch.zeros(3, 5))
    assert torch.all(s == torch.tensor(FP8_MIN_SCALE, dtype=torch.float32))


def test_specs_and_bad_schemes() -> None:
    assert qf.ActQuant.from_spec("INT8-static").to_json() == {
        "spec": "int8-static", "dtype": "int8", "dynamic": False, "granularity": "tensor", "observer": "absmax"}
    assert qf.ActQuant.from_spec("fp8").granularity == "token"
    for bad in ("int4", "fp8-dynamic", "int8static"):
        with pytest.raises(ValueError, match="use int8, int8-static, fp8 or fp8-static"):
            qf.ActQuant.from_spec(bad)
    with pytest.raises(ValueError, match="observer must be one of"):
        qf.ActQuant("int8", dynamic=False, observer="minmax")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs its calibrated scale"):
        qf.ActQuant("int8", dynamic=False).fake_quant(torch.ones(2, 2))
    with pytest.raises(ValueError, match="needs its input_scale"):
        qf.resolve_format("int8-sym").quantize(torch.ones(4, 8)).__class__(
            qf.resolve_format("int8-sym"), (4, 8), torch.float32, torch.zeros(32, dtype=torch.uint8),
            {"scale": torch.ones(4, 1, dtype=torch.float16)}, input_quant=qf.ActQuant("int8", dynamic=False))


def batches(seed: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(3, 50, 16, generator=g) for _ in range(4)]
    out[2][0, 3, 5] = 40.0  # one outlier
    return out


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_absmax_observer(dtype: str) -> None:
    xs = batches()
    obs = make_observer(qf.ActQuant(dtype, dynamic=False), sum(x.numel() for x in xs))
    for x in xs:
        obs.update(x)
    qmax = 127.0 if dtype == "int8" else 448.0
    assert obs.scale().item() == pytest.approx(40.0 / qmax, rel=1e-7)


@pytest.mark.parametrize("p", [99.99, 99.0, 50.0, 100.0])
def test_percentile_observer_is_numpys_inverted_cdf(p: float) -> None:
    xs = batches()
    act = qf.ActQuant("int8", dynamic=False, observer="percentile", percentile=p)
    obs = make_observer(act, sum(x.numel() for x in xs))
    for x in xs:
        obs.update(x)
    allx = np.abs(np.concatenate([x.double().numpy().ravel() for x in xs]))
    want = np.percentile(allx, p, method="inverted_cdf")
    assert obs.scale().item() == pytest.approx(want / 127.0, rel=1e-6)


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_mse_observer_is_the_brute_force_minimum(dtype: str) -> None:
    xs = batches(3)
    act = qf.ActQuant(dtype, dynamic=False, observer="mse")
    obs = make_observer(act, sum(x.numel() for x in xs))
    for index in range(obs.passes):
        for x in xs:
            obs.update(x, index)
    allx = np.concatenate([x.double().numpy().ravel() for x in xs])
    qmax = 127.0 if dtype == "int8" else 448.0
    absmax = np.abs(allx).max()
    candidates = f32(np.float32(absmax) * f32(1 - np.arange(21, dtype=np.float32) / 100) / qmax)
    errors = [np.sum(np.abs(allx - ref_fake_quant(allx, dtype, np.array([s]))) ** 2.4) for s in candidates]
    best = int(np.argmin(errors))
    assert obs.scale().item() == pytest.approx(candidates[best], rel=1e-6)
    if dtype == "int8":
        assert best > 0  # the outlier makes a clipped scale better than max|x| on the uniform grid


def test_quant_linear_multiplies_the_engines_inputs() -> None:
    """A QuantLinear whose input is int8 per token computes ``fq(x) @ W_deq.T`` (the reference
    kernel runs the weight; the input is quantized first, as the engine does)."""
    from quantfoundry.toolkit import select_kernel, swap_in

    g = torch.Generator().manual_seed(4)
    w, x = torch.randn(12, 32, generator=g), torch.randn(5, 32, generator=g) * 3
    fmt = qf.resolve_format("int8-sym")
    qw = fmt.quantize(w)
    qw.input_quant = qf.ActQuant("int8")
    root = torch.nn.Sequential(torch.nn.Linear(32, 12, bias=False))
    ql = swap_in(root, "0", qw, select_kernel(fmt, torch.device("cpu")))
    want = ref_fake_quant(x.double().numpy(), "int8", None) @ qw.dequantize().double().numpy().T
    np.testing.assert_allclose(ql(x).double().numpy(), want, rtol=1e-5, atol=1e-5)
    assert "input=int8" in repr(ql)

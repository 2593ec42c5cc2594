"""The built-in ``fp8-e4m3`` weight format against a float64 oracle of the e4m3 grid."""

from __future__ import annotations

import numpy as np
import pytest
import quantfoundry as qf
import torch
from fp8_reference import fp8_e4m3_bytes, fp8_round


def reference(w: torch.Tensor, per_tensor: bool, scale_dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Scales (max|w|/448 in float32, rounded to the storage dtype; 1 for a zero row) and the
    codes' bytes, from the bit-field oracle."""
    x = w.double().numpy()
    absmax = np.abs(x).max() if per_tensor else np.abs(x).max(axis=1, keepdims=True)
    s = np.float32(absmax) / np.float32(448.0)
    s = np.where(s == 0, np.float32(1.0), s).astype(np.float32)
    s = torch.from_numpy(np.asarray(s, dtype=np.float32)).to(scale_dtype).double().numpy()
    y = (x.astype(np.float32) / s.astype(np.float32)).astype(np.float64)
    values = fp8_round(y)
    table = fp8_e4m3_bytes()
    codes = np.vectorize(lambda v: table[float(v) + 0.0])(values)
    codes = np.where((values == 0) & np.signbit(y), 0x80, codes)  # a negative value rounding to 0 is -0
    return s, codes


@pytest.mark.parametrize("spec,per_tensor,sdt", [("fp8-e4m3", False, torch.float32),
                                                 ("fp8-e4m3-tensor", True, torch.float32),
                                                 ("fp8-e4m3-sbf16", False, torch.bfloat16)])
def test_codes_and_scales_follow_the_e4m3_grid(spec: str, per_tensor: bool, sdt: torch.dtype) -> None:
    fmt = qf.resolve_format(spec)
    assert fmt.spec == spec
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 64, generator=g) * torch.logspace(-4, 1, 24).unsqueeze(1)
    w[3] = 0  # a zero row
    w[5, :4] = torch.tensor([1e-30, -1e-30, 0.0, 0.0])  # subnormal codes
    qw = fmt.quantize(w)
    s, codes = reference(w, per_tensor, sdt)
    np.testing.assert_array_equal(qw.codes().numpy().astype(np.int64), codes)
    stored = qw.tensor_params["scale"] if per_tensor else qw.params["scale"]
    assert stored.dtype == sdt
    np.testing.assert_array_equal(stored.double().numpy().reshape(-1), np.asarray(s).reshape(-1))
    deq = qw.dequantize().double().numpy()
    np.testing.assert_allclose(deq, fp8_round((w.double().numpy().astype(np.float32) / np.asarray(s, np.float32))
                                              .astype(np.float64)) * s, rtol=1e-7, atol=0)


def test_sizes_and_bits_per_weight() -> None:
    assert qf.resolve_format("fp8-e4m3").nbytes((256, 512)) == 256 * 512 + 256 * 4
    assert qf.resolve_format("fp8-e4m3-tensor").nbytes((256, 512)) == 256 * 512 + 4
    assert qf.resolve_format("fp8-e4m3-sbf16").bits_per_weight((256, 512)) == pytest.approx(8 + 16 / 512)


def test_values_past_448_after_the_scales_rounding_saturate() -> None:
    """A bfloat16 scale rounded down would push max|w| / s past 448: the code saturates at 448."""
    w = torch.tensor([[448.0 * 1.00390625 * 0.999, -1.0, 0.5]])  # the bf16 scale rounds below max/448
    qw = qf.resolve_format("fp8-e4m3-sbf16").quantize(w)
    deq = qw.dequantize()
    assert torch.isfinite(deq).all()
    assert float(qw.codes()[0, 0].view(torch.float8_e4m3fn).float()) == 448.0


def test_gptq_keeps_the_per_tensor_scale(tiny_model) -> None:
    """The per-tensor scale (data model v2) is fitted once and what GPTQ rounded onto is stored."""
    r = qf.run(tiny_model("llama"), quantizer="gptq", format="fp8-e4m3-tensor", out=None, evaluators=[],
               progress=False, keep_model=True, calibrator_options={"n_samples": 4, "seq_len": 32})
    down = r.model.get_submodule("model.layers.0.mlp.down_proj")
    qw = down.qweight
    assert set(qw.tensor_params) == {"scale"} and not qw.params
    w = qw.dequantize()
    assert torch.all((w / qw.tensor_params["scale"]).abs() <= 448)

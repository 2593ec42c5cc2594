"""Run-time weight transforms (``QuantizedWeight.transforms``, kind ``rht``) against float64
matrices: the stored weight, its dequantization, the two ways a ``QuantLinear`` runs it, and
its round trip through the run journal."""

from __future__ import annotations

import pytest
import quantfoundry as qf
import torch
import torch.nn.functional as F
from quantfoundry import HadamardTransform, QuantizedWeight, QuantLinear
from quantfoundry.builtin.torch_dequant import TorchDequantKernel, TorchDequantOptions
from quantfoundry.pipeline.journal import BlockRecord, Journal
from quantfoundry.toolkit.hadamard import RandomHadamard, random_signs


def matrices(t: HadamardTransform) -> tuple[torch.Tensor, torch.Tensor]:
    """``Q_in`` and ``Q_out`` as float64 matrices, rebuilt from the seeds' signs."""
    return (RandomHadamard(random_signs(t.in_n, 2 * t.seed)).matrix(),
            RandomHadamard(random_signs(t.out_n, 2 * t.seed + 1)).matrix())


def test_maps_are_the_matrix_products() -> None:
    t = HadamardTransform.random((48, 96), seed=5)
    q_in, q_out = matrices(t)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 96, generator=g, dtype=torch.float64)
    h = torch.randn(96, 96, generator=g, dtype=torch.float64)
    h = h @ h.T
    x = torch.randn(3, 96, generator=g, dtype=torch.float64)
    assert torch.allclose(t.from_dense(w), q_out @ w @ q_in.T, atol=1e-12, rtol=0)
    assert torch.allclose(t.to_dense(t.from_dense(w)), w, atol=1e-12, rtol=0)
    assert torch.allclose(t.hessian(h), q_in @ h @ q_in.T, atol=1e-10, rtol=0)
    ws = t.from_dense(w)
    assert torch.allclose(t.apply_output(t.apply_input(x) @ ws.T), x @ w.T, atol=1e-12, rtol=0)
    assert t.nbytes() == 96 // 8 + 48 // 8  # the signs as bits


def test_real_scales_run_as_the_matrix_they_stand_for() -> None:
    """Fine-tuned real vectors in place of the signs (``with_scales``): the linear's run-time
    maps ``s ⊙ Hᵀ(W_s H(s' ⊙ x))/…`` equal the float64 matrix ``diag(s_out) H̃ᵀ W_s H̃ diag(s_in)``
    that ``to_dense`` gives; ``from_dense`` inverts it; stored as float16 and rebuilt."""
    g = torch.Generator().manual_seed(1)
    t = HadamardTransform.random((48, 96), seed=5)
    s_in = (torch.rand(96, generator=g) + 0.5) * random_signs(96, 10)
    s_out = (torch.rand(48, generator=g) + 0.5) * random_signs(48, 11)
    tt = t.with_scales(s_in, s_out)
    s_in, s_out = s_in.half().double(), s_out.half().double()  # as stored
    h_in = RandomHadamard(torch.ones(96)).matrix()
    h_out = RandomHadamard(torch.ones(48)).matrix()
    ws = torch.randn(48, 96, generator=g, dtype=torch.float64)
    dense = s_out[:, None] * (h_out.T @ ws @ h_in) * s_in[None, :]
    assert torch.allclose(tt.to_dense(ws), dense, atol=1e-12, rtol=0)
    assert torch.allclose(tt.from_dense(dense), ws, atol=1e-5, rtol=0)  # 1 / s in float32
    x = torch.randn(3, 96, generator=g, dtype=torch.float64)
    assert torch.allclose(tt.apply_output(tt.apply_input(x) @ ws.T), x @ dense.T, atol=1e-12, rtol=0)
    assert torch.allclose(tt.signs("in").double(), s_in) and tt.in_bits is None
    back = qf.HadamardTransform.from_stored(tt.to_json(), tt.tensors())
    assert torch.equal(back.to_dense(ws), tt.to_dense(ws))
    assert tt.nbytes() == 2 * (96 + 48)  # float16 vectors
    # one side tuned, the other kept as signs
    half = t.with_scales(None, s_out)
    assert half.in_bits is not None and half.out_scale is not None


def quantized(seed: int = 1) -> tuple[QuantizedWeight, torch.Tensor]:
    """An int8 weight stored with a transform, and the float64 weight it stands for."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 96, generator=g)
    t = HadamardTransform.random((48, 96), seed=seed)
    qw = qf.resolve_format("int8").quantize(t.from_dense(w))
    qw = QuantizedWeight(qw.format, qw.shape, qw.dtype, qw.packed, qw.params, transforms=(t,))
    q_in, q_out = matrices(t)
    return qw, q_out.T @ qw.format.dequantize(qw).double() @ q_in


def test_dequantize_undoes_the_transform() -> None:
    qw, expect = quantized()
    assert torch.allclose(qw.dequantize(torch.float64), expect, atol=1e-6, rtol=0)
    assert qw.nbytes() == qw.packed.numel() + sum(p.numel() * p.element_size() for p in qw.params.values()) + 18
    moved = qw.to("cpu")
    assert torch.equal(moved.dequantize(), qw.dequantize())


class StoredKernel(TorchDequantKernel):
    """The reference kernel multiplying by the stored weight: QuantLinear applies the transforms."""

    name = "test-stored"
    weight_transforms = "stored"

    def prepare(self, qw):
        return None

    def forward(self, x, qw, state, bias):
        return F.linear(x, qw.stored_dequantize().to(x.dtype), None if bias is None else bias.to(x.dtype))


class FusedKernel(StoredKernel):
    """Runs the transforms itself: gets the original input, returns the original output."""

    name = "test-fused"
    weight_transforms = "fused"

    def forward(self, x, qw, state, bias):
        for t in qw.transforms:
            x = t.apply_input(x)
        y = F.linear(x, qw.stored_dequantize().to(x.dtype))
        for t in reversed(qw.transforms):
            y = t.apply_output(y)
        return y if bias is None else y + bias.to(y.dtype)


class NoTransformKernel(StoredKernel):
    name = "test-none"
    weight_transforms = "none"


def test_quant_linear_runs_transforms_dense_or_around_the_kernel() -> None:
    qw, expect = quantized()
    bias = torch.randn(48, dtype=torch.float64)
    x = torch.randn(5, 96, dtype=torch.float64)
    want = x @ expect.T + bias
    dense = QuantLinear(qw, bias, TorchDequantKernel(TorchDequantOptions()))
    stored = QuantLinear(qw, bias, StoredKernel(TorchDequantOptions()))
    fused = QuantLinear(qw, bias, FusedKernel(TorchDequantOptions()))  # transforms not applied twice
    assert torch.allclose(dense(x), want, atol=1e-5, rtol=0)
    assert torch.allclose(stored(x), want, atol=1e-5, rtol=0)
    assert torch.allclose(fused(x), want, atol=1e-5, rtol=0)
    # a kernel that cannot run transforms is passed over, and alone it is an error
    mixed = QuantLinear(qw, bias, [NoTransformKernel(TorchDequantOptions()), StoredKernel(TorchDequantOptions())])
    assert [k.name for k in mixed.kernels] == ["test-stored"]
    with pytest.raises(ValueError, match="torch-dequant"):
        QuantLinear(qw, bias, NoTransformKernel(TorchDequantOptions()))
    # the sign bits are buffers: state_dict holds them, .to() moves them
    assert any(k.startswith("transform0_") for k in stored.state_dict())


def test_journal_keeps_transforms(tmp_path) -> None:
    qw, expect = quantized(seed=2)
    journal = Journal(tmp_path / "j", {"x": 1})
    journal.start(fresh=True)
    journal.write_block(0, BlockRecord([("model.layers.0.mlp.down_proj.weight", qw)]))
    (name, back), = journal.read_block(0).entries
    assert isinstance(back, QuantizedWeight) and back.transforms[0].kind == "rht"
    assert torch.equal(back.dequantize(), qw.dequantize())

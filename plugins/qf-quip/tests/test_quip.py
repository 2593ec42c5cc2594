"""The ``quip`` quantizer on real decoder blocks and end to end: error below rounding to
nearest, the stored transforms against float64 matrices, artifacts that reload bit for bit,
and exporters that cannot hold the transforms refused before any work."""

from __future__ import annotations

import pytest
import quantfoundry as qf
import torch
from qf_quip.quantizer import QuipOptions, QuipQuantizer
from quantfoundry.errors import IncompatiblePlanError
from quantfoundry.testing import LINEARS, inputs_of
from quantfoundry.testing import first_block as tiny_first_block
from quantfoundry.toolkit import unpack_bits
from quantfoundry.toolkit.hadamard import RandomHadamard


def first_block(folder, spec="e8p"):
    return tiny_first_block(folder, spec, n=8, seq=64)


def test_block_error_below_rounding_to_nearest(tiny_model):
    """Each linear's output error on its calibration inputs: QuIP# (incoherence + BlockLDLQ)
    and BlockLDLQ alone below e8p rounded to nearest."""
    folder = tiny_model("llama")
    ref = first_block(folder)
    fmt = qf.resolve_format("e8p")
    results = {}
    for incoherence in (True, False):
        block = first_block(folder)
        results[incoherence] = QuipQuantizer(QuipOptions(true_sequential=False, incoherence=incoherence)).quantize_block(
            block, qf.QuantContext(torch.device("cpu")))
    for name in LINEARS:
        w = ref.linear(name).weight.data.double()
        x = inputs_of(ref, name)

        def err(v: torch.Tensor, x: torch.Tensor = x, w: torch.Tensor = w) -> float:
            return float(((x @ (w - v).T) ** 2).sum())

        rtn = err(fmt.quantize(w.float()).dequantize(torch.float64))
        assert err(results[True][name].dequantize(torch.float64)) < rtn, name
        assert err(results[False][name].dequantize(torch.float64)) < rtn, name
        assert results[True][name].transforms and not results[False][name].transforms


def test_stored_weight_and_transforms_against_float64(tiny_model):
    """``dequantize`` is ``Q_outᵀ · decode(codes) · Q_in`` with ``Q = H diag(s) / √n`` built as
    float64 matrices from the stored sign bits; q, k and v share ``Q_in`` (one input)."""
    folder = tiny_model("llama")
    block = first_block(folder)
    out = QuipQuantizer(QuipOptions()).quantize_block(block, qf.QuantContext(torch.device("cpu")))

    def q_matrix(bits, n):
        signs = 1.0 - 2.0 * unpack_bits(bits, 1, n).double()
        return RandomHadamard(signs.float()).matrix()

    for name in LINEARS:
        qw = out[name]
        (t,) = qw.transforms
        rows, cols = qw.shape
        q_in, q_out = q_matrix(t.in_bits, cols), q_matrix(t.out_bits, rows)
        stored = qw.format.dequantize(qw).double()
        expect = q_out.T @ stored @ q_in
        assert torch.allclose(qw.dequantize(torch.float64), expect, atol=1e-6, rtol=0), name
    for other in ("self_attn.k_proj", "self_attn.v_proj"):
        assert torch.equal(out[other].transforms[0].in_bits, out["self_attn.q_proj"].transforms[0].in_bits)
    # k and v: the same shape, their own output signs (from their names)
    assert not torch.equal(out["self_attn.k_proj"].transforms[0].out_bits, out["self_attn.v_proj"].transforms[0].out_bits)


def test_artifact_reloads_bit_for_bit(tiny_model, tmp_path):
    folder = tiny_model("llama")
    r = qf.run(str(folder), quantizer="quip", format="e8p", out=str(tmp_path / "q"), evaluators=[],
               calibrator_options={"n_samples": 8, "seq_len": 64}, progress=False, keep_model=True)
    manifest = (tmp_path / "q" / "quantfoundry.json").read_text()
    assert '"rht"' in manifest and "e8p" in manifest
    loaded = qf.load(str(tmp_path / "q"))
    ids = torch.randint(0, 4096, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = r.model(ids).logits
        b = loaded(ids).logits
    assert torch.equal(a, b)


def test_exporter_without_transforms_is_refused_before_any_work(tiny_model, tmp_path):
    folder = tiny_model("llama")
    with pytest.raises(IncompatiblePlanError, match="run-time transforms"):
        qf.run(str(folder), quantizer="quip", format="int4-g64", exporter="hf-gptq", out=str(tmp_path / "x"),
               evaluators=[], progress=False)
    assert not (tmp_path / "x").exists()


def test_bad_options_are_one_line_errors():
    with pytest.raises(ValueError, match="damp_percent"):
        QuipOptions(damp_percent=0)
    with pytest.raises(ValueError, match="block_size"):
        QuipOptions(block_size=0)


def test_widths_without_a_hadamard_transform_are_refused_before_any_work(tiny_model, tmp_path):
    """An intermediate size of 11008 (43 · 2^8, Llama-2-7B's) has no Hadamard factor here."""
    folder = tiny_model("llama", intermediate_size=172)  # 43 · 4
    with pytest.raises(IncompatiblePlanError, match="incoherence=false"):
        qf.run(str(folder), quantizer="quip", format="e8p", out=str(tmp_path / "x"), evaluators=[], progress=False)
    assert not (tmp_path / "x").exists()

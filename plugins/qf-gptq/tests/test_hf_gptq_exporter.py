"""hf-gptq: the written checkpoint, read back by an independent reader, is qf's in-memory model."""

from __future__ import annotations

import json

import pytest
import quantfoundry as qf
import torch
from gptq_reader import read_gptq
from quantfoundry import QuantLinear
from quantfoundry.errors import IncompatiblePlanError, QFError, UsageError

CALIB = {"n_samples": 8, "seq_len": 128}


def run_gptq(out, fmt: str, model=None, exporter_options=None, **qopts):
    return qf.run(model, quantizer="gptq", quantizer_options=qopts, format=fmt, exporter="hf-gptq",
                  exporter_options=exporter_options, calibrator_options=CALIB, out=out, keep_model=True,
                  progress=False)


def float_model(folder, weights):
    """The original model with every quantized linear replaced by the reader's weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    for name, w in weights.items():
        model.get_submodule(name).weight.data = torch.from_numpy(w).float()
    return model


@pytest.mark.parametrize("fmt,qopts", [
    ("int4-g128", {"desc_act": True}),
    ("int4-g64-sym", {}),
    ("int3-g128", {"desc_act": True, "static_groups": True}),
    ("int2-g64-sym", {}),
    ("int8", {}),
])
def test_independent_reader_gives_the_in_memory_model(tmp_path, fmt, qopts):
    result = run_gptq(tmp_path / "out", fmt, **qopts)
    qcfg, weights, floats = read_gptq(tmp_path / "out")
    spec = qf.resolve_format(fmt)
    assert qcfg["bits"] == spec.options.bits and qcfg["sym"] == spec.options.sym
    assert qcfg["group_size"] == (spec.options.group_size or -1)
    assert qcfg["desc_act"] == (qopts.get("desc_act", False) and not qopts.get("static_groups", False))
    quantized = {n: m for n, m in result.model.named_modules() if isinstance(m, QuantLinear)}
    assert set(weights) == set(quantized) and len(weights) == 42
    for name, module in quantized.items():
        ours = module.qweight.dequantize(torch.float64).numpy()
        assert (weights[name] == ours).all(), name
    # logits: a plain transformers model carrying the reader's weights vs qf's in-memory model
    ids = torch.randint(0, 4096, (2, 64), generator=torch.Generator().manual_seed(0))
    reference = float_model(result.manifest["source"]["path"], weights)
    with torch.no_grad():
        ref_logits = reference(ids).logits
        our_logits = result.model(ids).logits
    torch.testing.assert_close(our_logits, ref_logits, rtol=1e-4, atol=1e-4)
    # float tensors are the checkpoint's, unchanged
    emb = floats["model.embed_tokens.weight"]
    assert emb.shape == (4096, 256)


def test_run_reloads_its_checkpoint_and_writes_both_configs(tmp_path):
    out = tmp_path / "out"
    result = qf.run(quantizer="gptq", format="int4-g128-sym", exporter="hf-gptq", calibrator_options=CALIB,
                    out=out, evaluators=["kl"], progress=False, quantizer_options={"desc_act": True})
    check = result.manifest["evaluation"]["artifact_check"]
    assert check["ok"], check
    assert result.metrics["kl"]["kl_mean"]["artifact"] == pytest.approx(result.metrics["kl"]["kl_mean"]["quantized"],
                                                                        rel=1e-6)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    legacy = json.loads((out / "quantize_config.json").read_text())
    assert cfg["quant_method"] == legacy["quant_method"] == "gptq"
    assert cfg["checkpoint_format"] == "gptq" and cfg["desc_act"] is True and cfg["sym"] is True
    assert (out / "tokenizer.json").exists()


def test_one_group_size_for_every_linear(tmp_path, tiny_model):
    """Widths that the requested group does not divide: the whole checkpoint takes the largest
    group that divides every linear (a GPTQ config has one group_size), and the run says so."""
    model = tiny_model("llama", hidden_size=96, intermediate_size=256, head_dim=24)
    result = run_gptq(tmp_path / "out", "int4-g128", model=model)
    qcfg, weights, _ = read_gptq(tmp_path / "out")
    assert qcfg["group_size"] == 32
    assert {e.format.spec for e in result.plan.quantized().values()} == {"int4-g32"}
    assert any("one group size for every linear" in n for n in result.notes)


def test_refuses_what_it_cannot_store_before_any_work(tmp_path):
    for fmt in ("int5-g128", "int4-g128-sf32"):
        with pytest.raises((UsageError, IncompatiblePlanError), match="hf-gptq"):
            qf.run(quantizer="gptq", format=fmt, exporter="hf-gptq", out=tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


def test_zero_point_zero_is_refused_without_leaving_a_folder(tmp_path, monkeypatch):
    """v1 (asked for: checkpoint_format=gptq) stores zero − 1: a zero point of 0 cannot be written;
    the error names the fix."""
    from qf_gptq import checkpoint

    real = checkpoint.to_gptq

    def with_a_zero(qw, checkpoint_format="gptq"):
        qw.params["zero"][0, 0] = 0
        return real(qw, checkpoint_format)

    monkeypatch.setattr("qf_gptq.exporter.to_gptq", with_a_zero)
    with pytest.raises(QFError, match="zero point 0.*gptq_v2.*-sym"):
        run_gptq(tmp_path / "out", "int4-g128", exporter_options={"checkpoint_format": "gptq"})
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*"))


def test_gptq_v2_stores_zero_points_as_they_are(tmp_path, monkeypatch):
    """checkpoint_format=gptq_v2: qzeros hold the zero points (no − 1), so a zero point of 0 is
    written, read back by the independent reader and by qf's loader, and the run's check passes."""
    from qf_gptq.quantizer import GPTQQuantizer

    real = GPTQQuantizer.quantize_block
    planted = {}

    def with_a_zero(self, block, ctx):
        out = real(self, block, ctx)
        if not planted:  # one weight: the first group of the first row, as quantized (memory and artifact)
            next(iter(out.values())).params["zero"][0, 0] = 0
            planted["done"] = True
        return out

    monkeypatch.setattr(GPTQQuantizer, "quantize_block", with_a_zero)
    out = tmp_path / "out"
    result = qf.run(quantizer="gptq", format="int3-g64", exporter="hf-gptq", calibrator_options=CALIB,
                    exporter_options={"checkpoint_format": "gptq_v2"}, out=out, evaluators=["kl"],
                    keep_model=True, progress=False)
    assert planted
    qcfg, weights, _ = read_gptq(out)
    assert qcfg["checkpoint_format"] == "gptq_v2" and qcfg["sym"] is False
    quantized = {n: m for n, m in result.model.named_modules() if isinstance(m, QuantLinear)}
    assert any((m.qweight.params["zero"] == 0).any() for m in quantized.values())
    for name, module in quantized.items():
        assert (weights[name] == module.qweight.dequantize(torch.float64).numpy()).all(), name
    assert result.manifest["evaluation"]["artifact_check"]["ok"]
    with pytest.raises(UsageError, match="checkpoint_format must be one of auto, gptq, gptq_v2"):
        qf.run(quantizer="gptq", exporter="hf-gptq", exporter_options={"checkpoint_format": "v3"},
               out=tmp_path / "bad", progress=False)


def test_act_order_without_static_groups_is_refused_for_gguf(tmp_path):
    import qf_gguf  # noqa: F401 - a hard requirement: CI installs qf-gguf, so these checks run, never skip
    with pytest.raises(IncompatiblePlanError, match="static_groups=true"):
        qf.run(quantizer="gptq", quantizer_options={"desc_act": True}, exporter="gguf", out=tmp_path / "g",
               progress=False)


@pytest.mark.parametrize("fmt,layout", [(None, "gptq"), ("int4-g128", "gptq_v2"), ("int4-g128-sym", "gptq")])
def test_defaults_every_loader_reads(tmp_path, fmt, layout):
    """No options: int4-g128-sym as v1 (GPTQModel, transformers, vLLM); an asymmetric grid goes
    to gptq_v2, which GPTQModel reads from any writer (tests/engines/ loads both)."""
    result = qf.run(quantizer="rtn", exporter="hf-gptq", format=fmt, out=tmp_path / "o", evaluators=[],
                    progress=False)
    qcfg, _weights, _ = read_gptq(tmp_path / "o")
    assert qcfg["checkpoint_format"] == layout and qcfg["sym"] == (layout == "gptq")
    legacy = json.loads((tmp_path / "o" / "quantize_config.json").read_text())
    assert legacy["checkpoint_format"] == layout and legacy["meta"]["quantizer"][0].startswith("quantfoundry:")
    assert result.run_command.endswith("# needs: pip install gptqmodel optimum")

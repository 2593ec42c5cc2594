"""GPTQ onto llama.cpp's K-quant mixes: the file llama.cpp runs is the in-memory model."""

from __future__ import annotations

import pytest
import quantfoundry as qf


def test_gptq_q4_k_m_runs_in_llama_cpp_and_beats_rtn(tmp_path, llama_cpp_python):
    common = dict(exporter="gguf", exporter_options={"type": "Q4_K_M"}, evaluators=["kl"], progress=False,
                  calibrator_options={"n_samples": 32, "seq_len": 512})
    gptq = qf.run(quantizer="gptq", out=tmp_path / "gptq", **common)
    ev = gptq.manifest["evaluation"]
    assert "llama.cpp" in ev["artifact"]["opened"], ev["artifact"]
    assert ev["artifact_check"]["ok"], ev["artifact_check"]
    kl = gptq.metrics["kl"]["kl_mean"]
    rtn = qf.run(quantizer="rtn", **{**common, "evaluators": ["kl"]})
    assert kl["quantized"] < 0.9 * rtn.metrics["kl"]["kl_mean"]["quantized"]
    assert kl["artifact"] == pytest.approx(kl["quantized"], rel=0.15, abs=0.006)
    plan = {e.format.spec for e in gptq.plan.quantized().values()}
    assert plan == {"Q4_K", "Q6_K"}

"""hf-awq: the written checkpoint, read back by an independent reader, is qf's in-memory model."""

from __future__ import annotations

import json

import pytest
import quantfoundry as qf
import torch
from awq_reader import read_awq
from quantfoundry import QuantLinear
from quantfoundry.errors import IncompatiblePlanError, UsageError

CALIB = {"n_samples": 8, "seq_len": 128}


@pytest.mark.parametrize("fmt", ["int4-g128", "int4-g64-sym"])
def test_independent_reader_gives_the_in_memory_model(tmp_path, fmt):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    result = qf.run(quantizer="awq", format=fmt, exporter="hf-awq", calibrator_options=CALIB, out=out,
                    keep_model=True, evaluators=["kl"], progress=False)
    assert result.manifest["evaluation"]["artifact_check"]["ok"]
    qcfg, weights, floats = read_awq(out)
    assert qcfg["group_size"] == qf.resolve_format(fmt).options.group_size and qcfg["zero_point"] is True
    legacy = json.loads((out / "quant_config.json").read_text())
    assert legacy == {"zero_point": True, "q_group_size": qcfg["group_size"], "w_bit": 4, "version": "GEMM"}
    quantized = {n: m for n, m in result.model.named_modules() if isinstance(m, QuantLinear)}
    assert set(weights) == set(quantized) and len(weights) == 42
    for name, module in quantized.items():
        assert (weights[name] == module.qweight.dequantize(torch.float64).numpy()).all(), name
    # a plain transformers model with the checkpoint's float tensors (norms carry AWQ's folded
    # scales) and the reader's weights gives the in-memory model's logits
    model = AutoModelForCausalLM.from_pretrained(result.manifest["source"]["path"], dtype=torch.float32).eval()
    state = {k: torch.from_numpy(v).float() for k, v in floats.items()}
    state.update({f"{n}.weight": torch.from_numpy(w).float() for n, w in weights.items()})
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k == "lm_head.weight" or "rotary" in k for k in missing), missing
    ids = torch.randint(0, 4096, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(result.model(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_refuses_what_it_cannot_store_before_any_work(tmp_path):
    for fmt in ("int3-g128", "int8", "int4"):
        with pytest.raises((UsageError, IncompatiblePlanError), match="hf-awq"):
            qf.run(quantizer="awq", format=fmt, exporter="hf-awq", out=tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()

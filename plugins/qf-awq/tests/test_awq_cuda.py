"""--device cuda: AWQ on the GPU gives the CPU's result (up to float rounding in the Gram
matrices and objectives, which may move a near-tied α or clip). Both rank candidates with the
exact fit (``exact_search=true``: the CPU's default search kernels sum in another order).
Runs where torch sees a GPU."""

from __future__ import annotations

import pytest
import quantfoundry as qf
import torch
from quantfoundry import QuantLinear
from quantfoundry.testing import assert_artifact_checked

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (device machine)")


@pytest.mark.parametrize("exporter,options,fmt", [("hf-awq", {}, "int4-g128"), ("gguf", {"type": "Q4_K_M"}, None)])
def test_run_on_cuda_matches_cpu(tmp_path, exporter, options, fmt):
    if exporter == "gguf":
        import qf_gguf  # noqa: F401 - a hard requirement: CI installs qf-gguf, so these checks run, never skip
    common = dict(quantizer="awq", quantizer_options={"exact_search": True}, format=fmt, exporter=exporter, exporter_options=options, evaluators=["kl"],
                  calibrator_options={"n_samples": 8, "seq_len": 256}, keep_model=True, progress=False)
    cpu = qf.run(out=tmp_path / "cpu", **common)
    gpu = qf.run(out=tmp_path / "gpu", device="cuda", **common)
    assert all(m.packed.is_cuda for m in gpu.model.modules() if isinstance(m, QuantLinear))
    def alphas(result):
        return {n: m.qweight.meta.get("awq", {}).get("alpha") for n, m in result.model.named_modules()
                if isinstance(m, QuantLinear) and ".layers." in n}

    a_cpu, a_gpu = alphas(cpu), alphas(gpu)
    assert all(v is not None for v in a_cpu.values()), a_cpu
    assert sum(a_cpu[n] == a_gpu[n] for n in a_cpu) >= 0.8 * len(a_cpu), (a_cpu, a_gpu)
    kl_cpu, kl_gpu = cpu.metrics["kl"]["kl_mean"]["quantized"], gpu.metrics["kl"]["kl_mean"]["quantized"]
    assert kl_gpu == pytest.approx(kl_cpu, rel=0.1)
    # the GPU machine has no llama-cpp-python: there a GGUF run must say it could not check (CPU run too)
    assert_artifact_checked(cpu, engine_may_be_missing=exporter == "gguf")
    assert_artifact_checked(gpu, engine_may_be_missing=exporter == "gguf")

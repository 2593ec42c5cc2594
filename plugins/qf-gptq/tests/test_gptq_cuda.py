"""--device cuda: GPTQ on the GPU gives the CPU's result (up to float rounding in the
Hessian and matmuls, which may flip a rare code). Runs where torch sees a GPU (the H100)."""

from __future__ import annotations

import pytest
import quantfoundry as qf
import torch
from quantfoundry import QuantLinear
from quantfoundry.testing import assert_artifact_checked
from quantfoundry.toolkit import Segment, ldlq_solve

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (device machine)")


@pytest.mark.parametrize("spec", ["int4-g128", "int3-g64-sym", "Q4_K", "Q6_K"])
def test_solver_on_cuda_matches_cpu(spec):
    if spec.startswith("Q"):
        import qf_gguf  # noqa: F401 - a hard requirement: CI installs qf-gguf, so these checks run, never skip
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 1024, generator=g) @ (torch.randn(1024, 1024, generator=g) / 32)
    h = 2 * x.T @ x / x.shape[0]
    w = torch.randn(256, 1024, generator=g) * 0.02
    fmt = qf.resolve_format(spec)
    for desc_act, static in ((False, False), (True, True)):
        a = ldlq_solve(w, h, [Segment(0, 256, fmt)], desc_act=desc_act, static_groups=static,
                       importance=torch.diagonal(h) / 2)
        b = ldlq_solve(w.cuda(), h.cuda(), [Segment(0, 256, fmt)], desc_act=desc_act, static_groups=static,
                       importance=torch.diagonal(h).cuda() / 2)
        assert b.values.is_cuda
        assert (a.codes[0] == b.codes[0].cpu()).double().mean() > 0.995
        ea = ((x.double() @ (w - a.values).double().T) ** 2).sum()
        eb = ((x.double() @ (w - b.values.cpu()).double().T) ** 2).sum()
        assert float(eb) == pytest.approx(float(ea), rel=0.01)


@pytest.mark.parametrize("exporter,options", [("hf-gptq", {}), ("gguf", {"type": "Q4_K_M"})])
def test_run_on_cuda_matches_cpu(tmp_path, exporter, options):
    if exporter == "gguf":
        import qf_gguf  # noqa: F401 - a hard requirement: CI installs qf-gguf, so these checks run, never skip
    common = dict(quantizer="gptq", exporter=exporter, exporter_options=options, evaluators=["kl"],
                  calibrator_options={"n_samples": 32, "seq_len": 256}, keep_model=True, progress=False)
    cpu = qf.run(out=tmp_path / "cpu", **common)
    gpu = qf.run(out=tmp_path / "gpu", device="cuda", **common)
    assert all(m.packed.is_cuda for m in gpu.model.modules() if isinstance(m, QuantLinear))
    kl_cpu, kl_gpu = cpu.metrics["kl"]["kl_mean"]["quantized"], gpu.metrics["kl"]["kl_mean"]["quantized"]
    assert kl_gpu == pytest.approx(kl_cpu, rel=0.1)
    # the GPU machine has no llama-cpp-python: there a GGUF run must say it could not check (CPU run too)
    assert_artifact_checked(cpu, engine_may_be_missing=exporter == "gguf")
    assert_artifact_checked(gpu, engine_may_be_missing=exporter == "gguf")


@pytest.mark.parametrize("specs", [("int4-g128",), ("int4-g32", "int8"), ("Q4_K", "Q6_K")])
def test_fused_kernel_matches_the_plain_loop(specs):
    """The Triton batch kernel against the Format-interface loop, both on the GPU."""
    if specs[0].startswith("Q"):
        import qf_gguf  # noqa: F401 - a hard requirement: CI installs qf-gguf, so these checks run, never skip
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4096, 512, generator=g) @ (torch.randn(512, 512, generator=g) / 22.6)
    h = (2 * x.T @ x / x.shape[0]).cuda()
    w = (torch.randn(300, 512, generator=g) * 0.02).cuda()
    segs = [Segment(0, 200, qf.resolve_format(specs[0]))]
    segs += [Segment(200, 300, qf.resolve_format(specs[1]))] if len(specs) > 1 else []
    if len(specs) == 1:
        segs = [Segment(0, 300, qf.resolve_format(specs[0]))]
    for desc_act in (False, True):
        a = ldlq_solve(w, h, segs, fused=False, desc_act=desc_act, importance=torch.diagonal(h) / 2)
        b = ldlq_solve(w, h, segs, fused=True, desc_act=desc_act, importance=torch.diagonal(h) / 2)
        same = sum(int((ca == cb).sum()) for ca, cb in zip(a.codes, b.codes, strict=True)) / w.numel()
        assert same > 0.995
        xc = x.cuda().double()
        ea = ((xc @ (w - a.values).double().T) ** 2).sum()
        eb = ((xc @ (w - b.values).double().T) ** 2).sum()
        assert float(eb) == pytest.approx(float(ea), rel=0.01)

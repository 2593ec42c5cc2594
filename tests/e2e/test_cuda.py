"""--device cuda: the same numbers as on the CPU. Runs where torch sees a GPU (the project's
H100 runs: see docs/benchmarks.md, section CUDA); on CPU-only machines there is nothing to run."""

from __future__ import annotations

import pytest
import quantfoundry as qf
import torch
from quantfoundry import QuantLinear

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (device machine)")


@pytest.mark.parametrize("spec", ["int8", "int4-g128", "int3-g64-sym", "int2-g32"])
def test_format_is_bit_identical_on_cuda(spec: str) -> None:
    fmt = qf.resolve_format(spec)
    w = torch.randn(512, 1024, generator=torch.Generator().manual_seed(0)) * 0.03
    a = fmt.quantize(w)
    b = fmt.quantize(w.cuda())
    assert b.packed.is_cuda
    assert torch.equal(a.packed, b.packed.cpu())
    for k in a.params:
        assert torch.equal(a.params[k], b.params[k].cpu())
    torch.testing.assert_close(b.dequantize().cpu(), a.dequantize(), rtol=0, atol=0)


def test_run_on_cuda_matches_cpu(tmp_path) -> None:
    cpu = qf.run(format="int4-g128", evaluators=["perplexity"], out=tmp_path / "cpu", keep_model=True, progress=False)
    gpu = qf.run(format="int4-g128", evaluators=["perplexity"], out=tmp_path / "gpu", keep_model=True,
                 device="cuda", progress=False)
    for (name, a), (_, b) in zip(
        ((n, m) for n, m in cpu.model.named_modules() if isinstance(m, QuantLinear)),
        ((n, m) for n, m in gpu.model.named_modules() if isinstance(m, QuantLinear)), strict=True):
        assert b.packed.is_cuda and b.kernel.name == "torch-dequant"
        assert torch.equal(a.qweight.packed, b.qweight.packed.cpu()), name
    p_cpu = cpu.metrics["perplexity"]["perplexity"]
    p_gpu = gpu.metrics["perplexity"]["perplexity"]
    assert p_gpu["original"] == pytest.approx(p_cpu["original"], rel=1e-3)
    assert p_gpu["quantized"] == pytest.approx(p_cpu["quantized"], rel=1e-3)
    assert (tmp_path / "cpu" / "model.safetensors").read_bytes() == (tmp_path / "gpu" / "model.safetensors").read_bytes()
    loaded = qf.load(tmp_path / "gpu", device="cuda")
    assert next(loaded.parameters()).is_cuda


def test_evaluators_on_cuda_match_cpu(tmp_path) -> None:
    evals = [("kl", {"max_tokens": 8000}), ("perplexity", {"protocol": "llama.cpp", "max_tokens": 8000}),
             ("speed", {"prompt_tokens": 64, "new_tokens": 8}), ("size", {})]
    cpu = qf.run(format="int4-g128", evaluators=evals, out=tmp_path / "cpu", progress=False)
    gpu = qf.run(format="int4-g128", evaluators=evals, out=tmp_path / "gpu", device="cuda", progress=False)
    for metric in ("kl_mean", "kl_p99", "ppl_quantized"):
        for col in ("quantized", "artifact"):
            assert gpu.metrics["kl"][metric][col] == pytest.approx(cpu.metrics["kl"][metric][col], rel=2e-3), metric
    assert abs(gpu.metrics["kl"]["same_top1_pct"]["quantized"] - cpu.metrics["kl"]["same_top1_pct"]["quantized"]) < 0.2
    assert gpu.metrics["perplexity"]["perplexity"]["original"] == pytest.approx(
        cpu.metrics["perplexity"]["perplexity"]["original"], rel=1e-3)
    s = gpu.metrics["speed"]
    assert s["device"]["quantized"].startswith("cuda")
    assert s["peak_mib"]["quantized"] >= s["weights_mib"]["quantized"] > 0
    assert gpu.manifest["evaluation"]["artifact_check"]["ok"]


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_moe_gptq_on_cuda_reaches_every_expert(tiny_model, tmp_path, arch) -> None:
    """A MoE's experts split into linears and calibrated with ``fill`` routing on the GPU: every
    expert rounded by GPTQ (no fallback note), the artifact (reopened) computes what the
    in-memory model does, and the codes are those of the CPU run but for a few weights whose
    rounding the GPU's float sums tip (the CPU and GPU Hessians differ in the last bits)."""
    folder = tiny_model(arch)
    cal = {"n_samples": 8, "seq_len": 64}
    runs = {dev: qf.run(folder, quantizer="gptq", calibrator_options=cal, device=dev, out=tmp_path / dev,
                        evaluators=["perplexity"], progress=False) for dev in ("cpu", "cuda")}
    gpu = runs["cuda"]
    assert not any("calibration token(s)" in n for n in gpu.manifest["notes"])
    assert not any("MISMATCH" in n for n in gpu.manifest["notes"])
    ppl = gpu.metrics["perplexity"]["perplexity"]
    assert ppl["artifact"] == pytest.approx(ppl["quantized"], rel=1e-3)
    assert ppl["quantized"] == pytest.approx(runs["cpu"].metrics["perplexity"]["perplexity"]["quantized"], rel=1e-2)


def test_two_processes_on_one_gpu_write_the_one_process_artifact(tiny_model, tmp_path) -> None:
    """``--devices cuda:0,cuda:0``: two processes on one GPU (gloo), the calibration sharded
    and the statistics reduced: the bytes of the one-process CUDA run."""
    folder = tiny_model("qwen2_moe")
    common = dict(quantizer="gptq", calibrator_options={"n_samples": 10, "seq_len": 64}, batch_size=2,
                  evaluators=[], progress=False)
    qf.run(folder, device="cuda", out=tmp_path / "one", **common)
    two = qf.run(folder, devices="cuda:0,cuda:0", out=tmp_path / "two", **common)
    assert (tmp_path / "one" / "model.safetensors").read_bytes() == (tmp_path / "two" / "model.safetensors").read_bytes()
    assert any("2 processes" in n for n in two.manifest["notes"])

"""Quantizer ``qat``: each fake-quantized linear computes exactly what its conversion stores (any
format: int, NF4, K-quants, with learned grids, adapters, W8A8 inputs); training through the
pipeline on the embedded pycode-7m lowers the KL to the original on held-out text, and the
artifact holds the fake-quantized model; a killed run resumes on the same trajectory; options are
checked before any work."""

from __future__ import annotations

import pytest
import quantfoundry as qf
import torch
import torch.nn.functional as F
from qf_qat import quantizer as qat
from qf_qat.quantizer import FakeQuantLinear, QATOptions
from quantfoundry.data import default_model_path

# int (asymmetric and symmetric), NF4, GGUF K-quants with super-blocks
SPECS = ("int4-g128", "int3-g64-sym", "int2-g64", "nf4", "Q3_K", "Q2_K", "Q4_K")


def _weight(rows: int = 32, cols: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * 0.02


def _trained(mod: FakeQuantLinear, seed: int = 1) -> None:
    """Move the trained parameters as a few optimiser steps would."""
    g = torch.Generator().manual_seed(seed)
    main, grid = mod.trained()
    with torch.no_grad():
        for p in main:  # a weight by about a grid step; an adapter's B so that B·A does the same
            p.add_(torch.randn(p.shape, generator=g) * (0.5 if p is getattr(mod, "lora_b", None) else 0.02))
        for p in grid:  # steps and offsets: a few per cent of a step
            p.mul_(1 + 0.03 * torch.randn(p.shape, generator=g))


CASES = [(spec, variant) for spec in SPECS for variant in ("weights", "lora")] + [
    (spec, "grid") for spec in SPECS if spec.startswith("int")]  # the grids that take learned steps back


@pytest.mark.parametrize(("spec", "variant"), CASES)
def test_the_conversion_stores_exactly_what_the_fake_quantized_linear_computed(spec: str, variant: str) -> None:
    fmt = qf.resolve_format(spec)
    w = _weight()
    start = fmt.quantize(w)
    mod = FakeQuantLinear(start, start.dequantize(), None, lora_rank=4 if variant == "lora" else 0,
                          learn_grid=variant == "grid")
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(3))
    # untrained, the fake-quantized linear is the first stage's weight
    assert torch.equal(mod(x), F.linear(x, start.dequantize()))
    _trained(mod)
    out = mod.quantized()
    assert out.format == fmt and out.shape == start.shape
    with torch.no_grad():
        # the stored weight: the format's own rounding of the trained float weight on the final grid
        assert torch.equal(out.dequantize(), fmt.quantize_dequantize(mod.merged(), out.full_params()))
        assert torch.equal(mod(x), F.linear(x, out.dequantize()))
    assert not torch.equal(out.dequantize(), start.dequantize())  # training moved it


@pytest.mark.parametrize("spec", ["nf4", "Q3_K"])
def test_learn_grid_where_the_format_cannot_take_learned_steps_back_is_refused(spec: str) -> None:
    start = qf.resolve_format(spec).quantize(_weight())  # a lookup grid; K-quants' 6-bit sub-block scales
    with pytest.raises(ValueError, match="no affine grid to learn"):
        FakeQuantLinear(start, start.dequantize(), None, learn_grid=True)


def test_w8a8_inputs_are_fake_quantized_as_the_engine_quantizes_them() -> None:
    from dataclasses import replace

    act = qf.ActQuant.from_spec("int8")
    start = replace(qf.resolve_format("int8").quantize(_weight()), input_quant=act)
    mod = FakeQuantLinear(start, start.dequantize(), None)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(3), requires_grad=True)
    y = mod(x)
    ref = F.linear(act.fake_quant(x.detach()), start.dequantize())
    assert torch.equal(y, ref) and not torch.equal(y, F.linear(x.detach(), start.dequantize()))
    y.sum().backward()  # the straight-through gradient: as if the input were not rounded
    assert torch.allclose(x.grad, start.dequantize().sum(0).expand(5, -1))
    out = mod.quantized()
    assert out.input_quant == act
    # the converted linear, run by the default CPU kernel, computes the same
    from quantfoundry.toolkit import select_kernel

    linear = qf.QuantLinear(out, None, select_kernel(out.format, torch.device("cpu")))
    with torch.no_grad():
        assert torch.equal(linear(x.detach()), y.detach())


def _run(tmp_path, name: str, opts: dict, spec: str = "int3-g128", **kw) -> qf.RunResult:
    return qf.run(str(default_model_path()), quantizer=[("qat", opts)], format=spec, out=str(tmp_path / name),
                  evaluators=[], calibrator_options={"n_samples": 24, "seq_len": 64}, progress=False,
                  keep_model=True, **kw)


def _held_out_kl(note_lines: list[str]) -> tuple[float, float]:
    note = next(n for n in note_lines if n.startswith("qat: held-out KL"))
    before, after = (float(v) for v in note.split("KL ")[1].split(" (")[0].split(" -> "))
    return before, after


@pytest.mark.parametrize("opts", [{}, {"lora_rank": 8, "lr": 1e-3}, {"learn_grid": True}, {"init": "gptq"}],
                         ids=["weights", "lora", "grid", "from-gptq"])
def test_training_lowers_the_held_out_kl_and_the_artifact_is_the_trained_model(tmp_path, opts) -> None:
    r = _run(tmp_path, "qat", {"steps": 12, "warmup": 2, "batch": 4, "held_out": 0.25, **opts})
    before, after = _held_out_kl(r.notes)
    assert after < 0.99 * before, r.notes  # measured: -22% (weights), -13% (adapters), -3.3% (from GPTQ)
    ids = torch.randint(0, 4096, (2, 48), generator=torch.Generator().manual_seed(7))
    loaded = qf.load(str(tmp_path / "qat"))
    with torch.no_grad():
        assert torch.equal(r.model(ids).logits, loaded(ids).logits)


def test_a_killed_run_resumes_on_the_same_trajectory(tmp_path, monkeypatch) -> None:
    results = []
    real = qat.distill

    def recording(*args, **kwargs):
        results.append(real(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(qat, "distill", recording)
    opts = {"steps": 8, "warmup": 2, "batch": 2, "learn_grid": True}
    whole = _run(tmp_path, "whole", opts)
    ckpt = tmp_path / "qat.ckpt"

    def killed(*args, progress, **kwargs):
        def stop(done: int, loss: float) -> None:
            progress(done, loss)
            if done == 6:
                raise KeyboardInterrupt

        return real(*args, progress=stop, **kwargs)

    monkeypatch.setattr(qat, "distill", killed)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "killed", {**opts, "checkpoint": str(ckpt), "checkpoint_every": 4})
    assert ckpt.exists()
    monkeypatch.setattr(qat, "distill", recording)
    resumed = _run(tmp_path, "resumed", {**opts, "checkpoint": str(ckpt), "checkpoint_every": 4})
    assert results[1].resumed_from == 4 and not ckpt.exists()
    assert results[1].losses == results[0].losses and results[1].held == results[0].held
    ids = torch.randint(0, 4096, (2, 48), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(whole.model(ids).logits, resumed.model(ids).logits)


def test_onto_a_gguf_k_quant_the_exporter_writes_the_trained_codes(tmp_path) -> None:
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    r = qf.run(str(default_model_path()), quantizer=[("qat", {"steps": 4, "warmup": 1, "batch": 4})],
               exporter="gguf", exporter_options={"type": "Q2_K"}, out=str(tmp_path / "q2k"), evaluators=[],
               calibrator_options={"n_samples": 12, "seq_len": 64}, progress=False, keep_model=True)
    tensors = {t.name: t for t in GGUFReader(str(tmp_path / "q2k" / "model.gguf")).tensors}
    mod = r.model.get_submodule("model.layers.0.mlp.down_proj")
    t = tensors["blk.0.ffn_down.weight"]
    stored = dequantize(t.data, t.tensor_type).reshape(mod.qweight.shape)
    np.testing.assert_array_equal(stored, mod.qweight.dequantize().numpy())


def test_formats_qat_cannot_train_are_refused_before_any_work() -> None:
    learned = qf.get_component("quantizer", "qat")(QATOptions(learn_grid=True))
    assert "learn_grid needs a grid" in learned.check_format(qf.resolve_format("nf4"))
    assert learned.check_format(qf.resolve_format("int3-g128")) is None
    quip = qf.get_component("quantizer", "qat")(QATOptions(init="quip"))
    assert "stores them transformed" in quip.check_format(qf.resolve_format("e8p"))


def test_options_are_checked_before_any_work() -> None:
    with pytest.raises(ValueError, match="learning rate"):
        QATOptions(lr=0)
    with pytest.raises(ValueError, match="init names"):
        QATOptions(init="qat")
    with pytest.raises(ValueError, match="checkpoint path"):
        QATOptions(checkpoint_every=5)
    with pytest.raises(ValueError, match="autocast is auto, on or off"):
        QATOptions(autocast="bf16")
    with pytest.raises(ValueError, match="lora_rank"):
        QATOptions(lora_rank=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bfloat16 autocast, checkpointed blocks)")
def test_on_cuda_with_bfloat16_autocast_and_checkpointed_blocks(tmp_path) -> None:
    """The CUDA defaults (autocast and gradient checkpointing on): training still lowers the KL and
    the artifact, loaded on the GPU, is the model the run kept."""
    r = _run(tmp_path, "cuda", {"steps": 16, "warmup": 2, "batch": 4, "held_out": 0.25},
             device="cuda")
    before, after = _held_out_kl(r.notes)
    assert after < 0.97 * before, r.notes
    ids = torch.randint(0, 4096, (2, 48), generator=torch.Generator().manual_seed(7)).cuda()
    dtype = str(next(r.model.parameters()).dtype).removeprefix("torch.")
    loaded = qf.load(str(tmp_path / "cuda"), device="cuda", dtype=dtype)
    with torch.no_grad():
        assert torch.equal(r.model(ids).logits, loaded(ids).logits)

"""``autoawq``: AutoAWQ's own scale search, clipping and grid through qf — the weights it stores
are AutoAWQ's own pseudo-quantized weights bit for bit; the two upstream faults it works around
are real (and the workaround restores AutoAWQ's function-preserving scaling); a whole run
exports and evaluates; grids and models AutoAWQ cannot take are refused in one line."""

from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import quantfoundry as qf
import torch
from qf_autoawq import AutoAWQQuantizer, _cpu_backups_copy
from quantfoundry import QuantPlan, TensorPlan
from quantfoundry.testing.conformance import QuantizerConformance

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from awq.models.auto import AWQ_CAUSAL_LM_MODEL_MAP  # the adapted library: missing, the tests fail

CONFIG = {"zero_point": True, "q_group_size": 32, "w_bit": 4, "version": "GEMM"}


def llama(tiny_model):
    from transformers import AutoModelForCausalLM

    folder = tiny_model("llama", hidden_size=128, intermediate_size=256, head_dim=32)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return folder, model


def calibration(model, n: int = 8, seq: int = 64) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (n, seq), generator=torch.Generator().manual_seed(0))


def autoawq_itself(model, ids: torch.Tensor, apply_clip: bool = True, workaround: bool = True):
    """AutoAWQ run directly (no qf) on ``model``, as its README runs it, export_compatible."""
    model.config.use_cache = False
    aw = AWQ_CAUSAL_LM_MODEL_MAP["llama"](model, "llama", False, model.config, None, None)
    with warnings.catch_warnings(), (_cpu_backups_copy() if workaround else contextlib.nullcontext()):
        warnings.simplefilter("ignore")
        aw.quantize(None, quant_config=CONFIG, calib_data=[r.tolist() for r in ids], max_calib_samples=len(ids),
                    max_calib_seq_len=ids.shape[1], n_parallel_calib_samples=None, export_compatible=True,
                    apply_clip=apply_clip)
    return aw


def test_the_stored_weights_are_autoawqs_own(tiny_model) -> None:
    _, model = llama(tiny_model)
    reference = copy.deepcopy(model)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    fmt = qf.resolve_format("int4-g32-sf32")  # float32 scales: AutoAWQ's own, unrounded
    plan = QuantPlan({n: TensorPlan(n, tuple(model.get_submodule(n).weight.shape), fmt) for n in names})
    ids = calibration(model)
    out = AutoAWQQuantizer().quantize_model(model, plan, ids, qf.QuantContext(device=torch.device("cpu")))
    aw = autoawq_itself(reference, ids)
    assert set(out) == set(names)
    for n in names:
        want, _, zeros = aw.quantizer.pseudo_quantize_tensor(reference.get_submodule(n).weight.data)
        assert torch.equal(out[n].dequantize(), want), n
        assert torch.equal(out[n].params["zero"].float(), zeros), n
    # the scales AutoAWQ folded into the norms are in the model the artifact is written from
    norm = "model.layers.0.post_attention_layernorm"
    assert torch.equal(model.get_submodule(norm).weight, reference.get_submodule(norm).weight)


def test_the_cpu_backup_fault_is_real_and_worked_around(tiny_model) -> None:
    """AutoAWQ's scaling alone (no clipping, no rounding) must leave the model's function as it
    was; on the CPU it does only with the backups copied."""
    _, model = llama(tiny_model)
    ids = calibration(model)
    x = calibration(model, 2, 32)
    with torch.no_grad():
        want = model(x).logits
    rel = {}
    for workaround in (False, True):
        m = copy.deepcopy(model)
        autoawq_itself(m, ids, apply_clip=False, workaround=workaround)
        with torch.no_grad():
            got = m(x).logits
        rel[workaround] = float((got - want).norm() / want.norm())
    assert rel[True] < 1e-5
    assert rel[False] > 1e-3


def test_a_whole_run_exports_and_evaluates(tiny_model, tmp_path) -> None:
    folder, _ = llama(tiny_model)
    r = qf.run(str(folder), quantizer="autoawq", format="int4-g32", exporter="hf-awq", out=tmp_path / "a",
               keep_model=True, progress=False, calibrator_options={"n_samples": "8", "seq_len": "64"},
               evaluators=[("kl", {"max_tokens": "1024"})])
    assert not [n for n in r.notes if n.startswith("MISMATCH")], r.notes
    assert r.metrics["kl"]["kl_mean"]["quantized"] < 1.0
    again = qf.load(tmp_path / "a").get_submodule("model.layers.0.mlp.down_proj").qweight
    ours = r.model.get_submodule("model.layers.0.mlp.down_proj").qweight
    assert torch.equal(again.dequantize(), ours.dequantize())


def test_grids_autoawq_cannot_take_are_refused_in_one_line(tiny_model) -> None:
    q = AutoAWQQuantizer()
    for spec in ("int3-g128", "int4-g128-sym", "int4-g256", "nf4"):
        reason = q.check_format(qf.resolve_format(spec))
        assert reason and "\n" not in reason and "int4-g128" in reason, spec
    assert q.check_format(qf.resolve_format("int4-g64")) is None
    with pytest.raises(qf.QFError, match="4-bit asymmetric"):
        qf.run(str(llama(tiny_model)[0]), quantizer="autoawq", format="int8", out=None, progress=False)


def test_an_architecture_autoawq_does_not_know_is_one_line(tiny_model) -> None:
    with pytest.raises(qf.QFError, match="AutoAWQ does not know model_type 'gemma3"):
        qf.run(str(tiny_model("gemma3")), quantizer="autoawq", format="int4-g32", out=None, progress=False,
               calibrator_options={"n_samples": "4", "seq_len": "64"}, evaluators=[])


class TestAutoAWQConformance(QuantizerConformance):
    quantizer = "autoawq"
    options = {"apply_clip": "false"}  # the tiny models' widths: AutoAWQ's clip search wants multiples of 64
    architectures = ("gemma", "gemma2", "llama", "mistral", "qwen2", "qwen3")  # AutoAWQ's map has no gemma3

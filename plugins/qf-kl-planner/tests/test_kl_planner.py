"""Planner ``kl``: its measurements against independent float64 references (the whole model
rerun, the KL by its formula, the output error from captured inputs), its plans against the
budget and the exporter's own mixes, GGUF and compressed-tensors artifacts, and its cache."""

from __future__ import annotations

import copy
import json

import pytest
import quantfoundry as qf
import torch
from qf_kl_planner import sensitivity as sens_mod
from qf_kl_planner.sensitivity import EMBEDDINGS, HEAD, Sensitivity
from quantfoundry.data import default_model_path
from quantfoundry.errors import IncompatiblePlanError, OptionsError, UsageError
from quantfoundry.toolkit import load_full_model

PYCODE = str(default_model_path())
CAL = {"n_samples": 8, "seq_len": 96}
FAST = {"samples": 4, "positions": 32}


@pytest.fixture(scope="module")
def pycode():
    source = qf.resolve_model(PYCODE)
    model = load_full_model(source, dtype=torch.float32, device=torch.device("cpu"))
    cal = qf.get_component("calibrator", "text")(qf.get_component("calibrator", "text").Options(**CAL))
    ids = cal.load(source.tokenizer()).input_ids[:4]
    return source, model, ids


def _kl64(ref_model, model, ids, positions):
    """KL(p_ref || p) per position, in float64, averaged: the formula, from two whole forwards."""
    with torch.no_grad():
        p = torch.log_softmax(ref_model(input_ids=ids).logits.double()[:, positions], -1)
        q = torch.log_softmax(model(input_ids=ids).logits.double()[:, positions], -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.mark.parametrize(("name", "start"), [("model.layers.3.mlp.down_proj", 3), ("model.layers.0.self_attn.v_proj", 0),
                                             ("lm_head", HEAD), ("model.embed_tokens", EMBEDDINGS)])
def test_a_tensor_alone_changes_the_kl_the_whole_model_does(pycode, name, start):
    source, model, ids = pycode
    positions = torch.tensor([0, 17, 40, 95])
    sens = Sensitivity(copy.deepcopy(model), source, list(ids.split(2)), positions=positions)
    assert sens.start_of([name]) == start
    fmt = qf.resolve_format("Q3_K")
    got = sens.measure({name: fmt})
    changed = copy.deepcopy(model)
    w = changed.get_submodule(name).weight
    w.data.copy_(fmt.quantize(w.data.float()).dequantize())
    want = _kl64(model, changed, ids, positions)
    assert want > 1e-5
    assert got == pytest.approx(want, rel=1e-3)
    # restored bit-exactly: measured again without a change, the model is the float one
    assert torch.equal(sens.model.get_submodule(name).weight, model.get_submodule(name).weight)
    assert sens.kl() == pytest.approx(0.0, abs=1e-7)


def test_the_output_error_is_the_mean_squared_change_of_the_outputs(pycode):
    source, model, ids = pycode
    sens = Sensitivity(copy.deepcopy(model), source, list(ids.split(2)))
    for name in ("model.layers.2.mlp.down_proj", "model.layers.5.self_attn.k_proj", "lm_head"):
        seen: list[torch.Tensor] = []
        h = model.get_submodule(name).register_forward_pre_hook(lambda _m, a, seen=seen: seen.append(a[0].double()))
        with torch.no_grad():
            model(input_ids=ids)
        h.remove()
        x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen])
        w = model.get_submodule(name).weight.data.double()
        fmt = qf.resolve_format("Q4_K")
        delta = fmt.quantize(w.float()).dequantize().double() - w
        want = float(((x @ delta.T) ** 2).sum() / x.shape[0])
        assert sens.output_error(name, fmt) == pytest.approx(want, rel=1e-4)


def _plan(tmp_path=None, **kw):
    """A dry run's plan (the planner measures; nothing is quantized or written)."""
    from quantfoundry.pipeline.stages import RunRequest, load_and_plan, resolve

    args = {"model": PYCODE, "exporter": "gguf", "calibrator_options": CAL, "progress": False, **kw}
    state = resolve(RunRequest(**args))
    load_and_plan(state, dry_run=True)
    return state


def test_the_plan_beats_llama_cpps_mix_of_the_same_size(pycode, tmp_path):
    """At the bytes of llama.cpp's Q3_K_M rules, the planner's mix adds less KL than the rules' —
    both measured the same way, every tensor rounded at once."""
    source, model, ids = pycode
    rules = _plan(exporter_options={"type": "Q3_K_M"})
    from quantfoundry.pipeline.stages import plan_request

    state = _plan(exporter_options={"type": "Q3_K_M"}, planner="kl", planner_options=FAST, target_bpw=32)
    req = plan_request(state, state.source, rules.plan)  # the byte count of the rules' own plan
    rules_bytes = req.total_bytes({n: rules.plan.entries[n].format for n in req.candidates})
    mixed = _plan(exporter_options={"type": "Q3_K_M"}, planner="kl", planner_options=FAST, target_size=rules_bytes)
    info = mixed.plan.planner
    assert info["planned_bytes"] <= rules_bytes == info["budget_bytes"]
    assert len({e.format.spec for e in mixed.plan.quantized().values()}) >= 3
    sens = Sensitivity(copy.deepcopy(model), source, list(ids.split(2)))
    kl = {}
    for label, plan in (("rules", rules.plan), ("planner", mixed.plan)):
        with sens.changed({n: e.format for n, e in plan.quantized().items()}):
            kl[label] = sens.kl()
    assert kl["planner"] < 0.8 * kl["rules"], kl
    # the prediction (each tensor alone, summed) is close to the joint measurement
    assert info["measured_kl"] == pytest.approx(info["predicted_kl"], rel=0.25)


def test_a_gguf_holds_the_chosen_types_in_exactly_the_planned_bytes(tmp_path, llama_cpp_python):
    """gguf-py reads each tensor's chosen type; llama.cpp runs the file as the in-memory model."""
    import gguf

    out = tmp_path / "mixed"
    r = qf.run(PYCODE, exporter="gguf", planner="kl", planner_options=FAST, target_bpw=4.2, out=str(out),
               calibrator_options=CAL, evaluators=[("kl", {"max_tokens": "4096"})], progress=False)
    ev = r.manifest["evaluation"]
    assert "llama.cpp" in ev["artifact"]["opened"] and ev["artifact_check"]["ok"], ev["artifact_check"]
    assert r.manifest["planner"]["measured_kl_mean"]["artifact"] > 0
    reader = gguf.GGUFReader(str(out / "model.gguf"))
    types = {t.name: gguf.GGMLQuantizationType(t.tensor_type).name for t in reader.tensors}
    assert sum(int(t.n_bytes) for t in reader.tensors) == r.manifest["planner"]["planned_bytes"]
    assert r.manifest["planner"]["planned_bytes"] <= r.manifest["planner"]["budget_bytes"]
    assert types["blk.0.ffn_down.weight"] == r.plan.entries["model.layers.0.mlp.down_proj"].format.spec
    assert types["output.weight"] == r.plan.entries["lm_head"].format.spec
    assert len({types[n] for n in types if n.startswith("blk.") and not n.endswith("norm.weight")}) >= 2
    manifest = json.loads((out / "quantfoundry.json").read_text())
    assert manifest["planner"]["name"] == "kl" and "measured_kl" in manifest["planner"]
    assert manifest["gguf"]["tensor_types"] == {t: list(types.values()).count(t) for t in set(types.values())}


@pytest.mark.parametrize("quantizer", ["gptq", "awq", "hqq"])
def test_any_quantizer_rounds_onto_the_planned_mix(quantizer, tiny_model, tmp_path):
    folder = tiny_model("llama", hidden_size=256, intermediate_size=512, head_dim=64, num_attention_heads=4,
                        num_key_value_heads=2)
    out = tmp_path / quantizer
    r = qf.run(str(folder), quantizer=quantizer, format="int4-g64", planner="kl", planner_options=FAST,
               target_bpw=12, out=str(out), calibrator_options={"n_samples": 4, "seq_len": 64},
               evaluators=[("kl", {"max_tokens": "1024"})], keep_model=True, progress=False)
    assert not [n for n in r.notes if n.startswith("MISMATCH")]
    widths = {e.format.options.bits for n, e in r.plan.quantized().items() if ".layers." in n}
    assert len(widths) >= 2, widths
    for name, entry in r.plan.quantized().items():
        assert r.model.get_submodule(name).qweight.format == entry.format
    assert r.manifest["planner"]["planned_bytes"] <= r.manifest["planner"]["budget_bytes"]


def test_replanning_at_another_budget_measures_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("QF_CACHE_DIR", str(tmp_path / "cache"))
    first = _plan(planner="kl", planner_options={**FAST, "check": False}, target_bpw=4.0)
    assert first.plan.planner["cached"] is False

    def refuse(*_a, **_k):
        raise AssertionError("measured again")

    monkeypatch.setattr(sens_mod.Sensitivity, "measure", refuse)
    monkeypatch.setattr(sens_mod.Sensitivity, "__init__", refuse)  # not even the model is loaded
    second = _plan(planner="kl", planner_options={**FAST, "check": False}, target_bpw=5.0)
    assert second.plan.planner["cached"] is True
    assert second.plan.planner["planned_bytes"] > first.plan.planner["planned_bytes"]
    assert second.plan.planner["table"] == first.plan.planner["table"]
    # fewer candidates: their entries are in the table already
    third = _plan(planner="kl", planner_options={**FAST, "check": False, "formats": "Q3_K,Q4_K,Q6_K"}, target_bpw=4.5)
    assert third.plan.planner["measured_units"] == 0
    assert {e.format.spec for n, e in third.plan.quantized().items() if ".layers." in n} <= {"Q3_K", "Q4_K", "Q6_K"}


def test_more_bytes_never_predict_more_kl(tmp_path, monkeypatch):
    monkeypatch.setenv("QF_CACHE_DIR", str(tmp_path / "cache"))
    predicted = [_plan(planner="kl", planner_options={**FAST, "check": False}, target_bpw=b).plan.planner["predicted_kl"]
                 for b in (3.0, 3.5, 4.5, 6.0)]
    assert predicted == sorted(predicted, reverse=True) and predicted[-1] < predicted[0] / 10


def test_scaled_sensitivities_follow_the_measured_ones(tmp_path, monkeypatch):
    """One KL per linear, the other formats scaled by their output error: on pycode-7m (128
    positions here) half the scaled KLs are within 15% of the measured ones, 90% within 40%, all
    within a factor 2.2 (validation of the cheaper mode; the benchmark checks it on more text)."""
    monkeypatch.setenv("QF_CACHE_DIR", str(tmp_path / "cache"))
    opts = {**FAST, "check": False}
    measured = _plan(planner="kl", planner_options=opts, target_bpw=4).plan.planner["table"]
    scaled = _plan(planner="kl", planner_options={**opts, "sensitivity": "scaled"}, target_bpw=4).plan.planner["table"]
    ratios = [scaled[u][f] / measured[u][f] for u in measured for f in measured[u] if measured[u][f] > 1e-6]
    assert len(ratios) > 200
    off = sorted(max(r, 1 / r) for r in ratios)
    assert off[len(off) // 2] < 1.15 and off[int(0.9 * len(off))] < 1.4 and off[-1] < 2.2, off


def test_compressed_tensors_mixes_per_layer_groups_with_fused_linears_tied(tiny_model, tmp_path):
    """int4/int8 config groups and ignored (float) linears, q/k/v and gate/up sharing one scheme
    (vLLM fuses them), loaded by transformers' compressed-tensors integration as qf reloads it."""
    out = tmp_path / "ct"
    folder = tiny_model("llama", hidden_size=256, intermediate_size=512, head_dim=64, num_attention_heads=4,
                        num_key_value_heads=2)
    r = qf.run(str(folder), exporter="compressed-tensors", format="int4-g128-sym", planner="kl",
               planner_options=FAST, target_bpw=13, out=str(out), calibrator_options={"n_samples": 4, "seq_len": 64},
               evaluators=[("kl", {"max_tokens": "1024"})], progress=False)
    assert not [n for n in r.notes if n.startswith("MISMATCH")]
    plan = r.plan.entries
    for i in range(2):
        p = f"model.layers.{i}"
        qkv = {plan[f"{p}.self_attn.{x}_proj"].format for x in "qkv"}
        gate_up = {plan[f"{p}.mlp.{x}_proj"].format for x in ("gate", "up")}
        assert len(qkv) == 1 and len(gate_up) == 1
    chosen = {(e.format.spec if e.format else "float") for n, e in plan.items() if ".layers." in n}
    assert len(chosen) >= 2, chosen
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    grouped = {n for g in config["config_groups"].values() for n in g["targets"]}
    assert grouped == {n for n, e in plan.items() if e.format is not None}
    for group in config["config_groups"].values():
        bits = {plan[n].format.options.bits for n in group["targets"]}
        assert bits == {group["weights"]["num_bits"]}
    assert set(config["ignore"]) >= {n for n, e in plan.items() if e.format is None and ".layers." in n}
    # the compressed-tensors library (through transformers) reads each group's scheme as qf does
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ours = qf.load(str(out))
    ids = torch.randint(0, 4000, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_exporters_that_store_one_format_refuse_a_mix_before_any_work(tmp_path):
    out = tmp_path / "x"
    with pytest.raises(IncompatiblePlanError, match="one format for every tensor"):
        qf.run(PYCODE, quantizer="gptq", exporter="hf-gptq", planner="kl", target_bpw=4, out=str(out),
               calibrator_options=CAL, evaluators=[], progress=False)
    assert not out.exists()


@pytest.mark.parametrize(("opts", "match"), [({"samples": 0}, "samples"), ({"positions": -1}, "positions"),
                                             ({"formats": "Q9_Z"}, "formats"), ({"sensitivity": "guess"}, "sensitivity")])
def test_bad_options_are_one_line_errors(opts, match):
    with pytest.raises(OptionsError, match=match):
        qf.run(PYCODE, exporter="gguf", planner="kl", planner_options=opts, target_bpw=4, evaluators=[], progress=False)


def test_formats_restrict_the_candidates(tmp_path, monkeypatch):
    monkeypatch.setenv("QF_CACHE_DIR", str(tmp_path / "cache"))
    state = _plan(planner="kl", planner_options={**FAST, "formats": "Q3_K,Q5_K,Q8_0", "check": False}, target_bpw=5)
    assert {e.format.spec for e in state.plan.quantized().values()} <= {"Q3_K", "Q5_K", "Q8_0"}
    with pytest.raises(UsageError, match="leaves .* no format"):
        _plan(planner="kl", planner_options={**FAST, "formats": "Q4_0"}, target_bpw=5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: runs on the GPU machine")
def test_on_cuda_the_measurements_agree_with_the_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("QF_CACHE_DIR", str(tmp_path / "cache"))
    cpu = _plan(planner="kl", planner_options={**FAST, "check": False}, target_bpw=4).plan.planner["table"]
    gpu = _plan(planner="kl", planner_options={**FAST, "check": False}, target_bpw=4,
                device="cuda").plan.planner["table"]
    for unit, row in cpu.items():
        for spec, kl in row.items():
            assert gpu[unit][spec] == pytest.approx(kl, rel=0.05, abs=1e-6), (unit, spec)


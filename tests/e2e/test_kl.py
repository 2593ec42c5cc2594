"""The ``kl`` evaluator against a float64 formula, its self-consistency, and the reference cache."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import quantfoundry as qf
import quantfoundry.evaluation.reference as reference_mod
import torch
from quantfoundry import EvalTarget, resolve_model
from quantfoundry.builtin.kl import KLEvaluator, KLOptions
from quantfoundry.data import default_eval_text
from quantfoundry.evaluation.reference import Reference
from safetensors.torch import load_file, save_file

CPU = torch.device("cpu")
CTX = 64
MAX_TOKENS = 1_000


@pytest.fixture
def tiny_pair(tiny_model, tmp_path) -> tuple[Path, Path]:
    """A tiny Llama and a damaged copy (every matrix rounded to a grid of 0.03, as a quantizer would)."""
    orig = tiny_model("llama")
    damaged = tmp_path / "damaged"
    shutil.copytree(orig, damaged)
    tensors = load_file(str(orig / "model.safetensors"))
    out = {k: (torch.round(v.float() / 0.03) * 0.03).to(v.dtype) if v.ndim == 2 and "embed" not in k else v
           for k, v in tensors.items()}
    save_file(out, str(damaged / "model.safetensors"), metadata={"format": "pt"})
    return orig, damaged


def _target(folder: Path, reference: Reference | None, label: str = "quantized") -> EvalTarget:
    from transformers import AutoModelForCausalLM

    source = resolve_model(folder)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    return EvalTarget(model, source.tokenizer(), source, label, CPU, reference=reference)


def _reference(folder: Path, cache: Path | None = None) -> Reference:
    source = resolve_model(folder)
    return Reference(source, source.tokenizer(), CPU, cache=cache)


def float64_kl(orig: Path, damaged: Path, text: str) -> dict[str, float]:
    """KL(P‖Q) per position written out in float64, core protocol (windows of CTX, no BOS)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(orig))
    ids = tok(text, add_special_tokens=False).input_ids[:MAX_TOKENS]
    p_model = AutoModelForCausalLM.from_pretrained(str(orig), dtype=torch.float64).eval()
    q_model = AutoModelForCausalLM.from_pretrained(str(damaged), dtype=torch.float64).eval()
    kls, flips, nll_p, nll_q = [], [], [], []
    with torch.no_grad():
        for start in range(0, len(ids), CTX):
            w = torch.tensor([ids[start:start + CTX]])
            if w.shape[1] < 2:
                continue
            lp = torch.log_softmax(p_model(input_ids=w).logits[0, :-1], -1).numpy()
            lq = torch.log_softmax(q_model(input_ids=w).logits[0, :-1], -1).numpy()
            nxt = w[0, 1:].numpy()
            kls += list((np.exp(lp) * (lp - lq)).sum(-1))
            flips += list(lp.argmax(-1) != lq.argmax(-1))
            nll_p += list(-lp[np.arange(len(nxt)), nxt])
            nll_q += list(-lq[np.arange(len(nxt)), nxt])
    k = np.array(kls)
    return {"kl_mean": k.mean(), "kl_median": np.median(k), "kl_p99": np.percentile(k, 99), "kl_max": k.max(),
            "flip_rate": float(np.mean(flips)), "ppl_original": math.exp(np.mean(nll_p)),
            "ppl_quantized": math.exp(np.mean(nll_q)), "tokens": len(k)}


def test_kl_of_a_model_with_itself_is_zero(tiny_model) -> None:
    folder = tiny_model("llama")
    ref = _reference(folder)
    target = EvalTarget(ref.target().model, ref.tokenizer, ref.source, "quantized", CPU, reference=ref)
    for top_k in (0, 64):
        m = KLEvaluator(KLOptions(ctx=CTX, max_tokens=MAX_TOKENS, top_k=top_k)).evaluate(target)
        assert m["kl_mean"] == 0.0 and m["kl_max"] == 0.0 and m["kl_p99"] == 0.0
        assert m["flip_rate"] == 0.0 and m["same_top1_pct"] == 100.0
        assert m["ppl_ratio"] == pytest.approx(1.0, abs=1e-12)
        assert m["tokens"] == MAX_TOKENS - math.ceil(MAX_TOKENS / CTX)


def test_kl_matches_a_float64_formula(tiny_pair) -> None:
    orig, damaged = tiny_pair
    want = float64_kl(orig, damaged, default_eval_text().read_text())
    ref = _reference(orig)
    got = KLEvaluator(KLOptions(ctx=CTX, max_tokens=MAX_TOKENS, top_k=0, path=default_eval_text())).evaluate(
        _target(damaged, ref))
    assert want["kl_mean"] > 1e-3  # the damage is real, so the comparison means something
    assert got["tokens"] == want["tokens"]
    for key in ("kl_mean", "kl_median", "kl_p99", "kl_max", "ppl_original", "ppl_quantized"):
        assert got[key] == pytest.approx(want[key], rel=2e-4), key
    assert got["flip_rate"] == pytest.approx(want["flip_rate"], abs=2 / want["tokens"])  # float32 near-ties


def test_top_k_kl_is_a_close_lower_bound(tiny_pair) -> None:
    orig, damaged = tiny_pair
    ref = _reference(orig)
    target = _target(damaged, ref)
    exact = KLEvaluator(KLOptions(ctx=CTX, max_tokens=MAX_TOKENS, top_k=0)).evaluate(target)
    means = []
    for k in (64, 1024, 4000):  # of a 4096-token vocabulary (the random model's distributions are flat)
        approx = KLEvaluator(KLOptions(ctx=CTX, max_tokens=MAX_TOKENS, top_k=k)).evaluate(target)
        assert approx["kl_mean"] <= exact["kl_mean"] * (1 + 1e-9)
        assert approx["same_top1_pct"] == exact["same_top1_pct"]
        assert approx["ppl_quantized"] == pytest.approx(exact["ppl_quantized"], rel=1e-9)
        means.append(approx["kl_mean"])
    assert means == sorted(means)  # more of the distribution kept, closer to the exact value
    assert means[-1] == pytest.approx(exact["kl_mean"], rel=0.02)


def test_reference_cache_is_hit_then_invalidated_by_a_new_text(tiny_model, tmp_path, monkeypatch) -> None:
    folder = tiny_model("llama")
    monkeypatch.setenv("QF_CACHE_DIR", str(tmp_path / "cache"))
    loads: list[int] = []
    real = reference_mod.load_full_model

    def counting(*a, **k):
        loads.append(1)
        return real(*a, **k)

    monkeypatch.setattr(reference_mod, "load_full_model", counting)
    evals = [("kl", {"ctx": CTX, "max_tokens": MAX_TOKENS}), ("perplexity", {"ctx": CTX, "max_tokens": MAX_TOKENS})]
    first = qf.run(folder, format="int4-g32", out=None, evaluators=evals, progress=False)
    assert len(loads) == 1  # one load of the original serves both evaluators
    assert first.manifest["evaluation"]["reference"]["cache_misses"] == 2
    second = qf.run(folder, format="int8", out=None, evaluators=evals, progress=False)
    assert len(loads) == 1  # no second forward of the original: both results came from the cache
    assert second.manifest["evaluation"]["reference"]["cache_hits"] == 2
    assert second.metrics["perplexity"]["perplexity"]["original"] == first.metrics["perplexity"]["perplexity"]["original"]
    assert second.metrics["kl"]["ppl_original"]["quantized"] == first.metrics["kl"]["ppl_original"]["quantized"]
    assert second.metrics["kl"]["kl_mean"]["quantized"] < first.metrics["kl"]["kl_mean"]["quantized"]

    other = tmp_path / "other.txt"
    other.write_text(default_eval_text().read_text()[5000:])
    evals_other = [(n, {**o, "path": str(other)}) for n, o in evals]
    qf.run(folder, format="int8", out=None, evaluators=evals_other, progress=False)
    assert len(loads) == 2  # a different text is a different cache entry
    other.write_text(default_eval_text().read_text()[9000:])  # same path, new content
    qf.run(folder, format="int8", out=None, evaluators=evals_other, progress=False)
    assert len(loads) == 3
    qf.run(folder, format="int8", out=None, evaluators=evals, progress=False, cache=False)
    assert len(loads) == 4  # cache=False never reads it


def test_damaged_cache_file_is_recomputed(tiny_model, tmp_path) -> None:
    folder = tiny_model("llama")
    ref = _reference(folder, cache=tmp_path / "c")
    target = EvalTarget(None, ref.tokenizer, ref.source, "quantized", CPU, reference=ref)
    target.model = ref.target().model
    opts = KLOptions(ctx=CTX, max_tokens=200)
    KLEvaluator(opts).evaluate(target)
    files = list((tmp_path / "c").rglob("kl-*.safetensors"))
    assert len(files) == 1
    files[0].write_bytes(b"not a safetensors file")
    fresh = _reference(folder, cache=tmp_path / "c")
    t2 = EvalTarget(target.model, fresh.tokenizer, fresh.source, "quantized", CPU, reference=fresh)
    with pytest.warns(UserWarning, match="damaged cache file"):
        m = KLEvaluator(opts).evaluate(t2)
    assert m["kl_mean"] == 0.0 and fresh.misses == 1

"""llama.cpp (through llama-cpp-python) as the engine serving our GGUF files.

The independent references: transformers on the original float model (an F32 GGUF made by
llama.cpp's own converter must give its logits), the `sentencepiece` library (the tokenizer
pycode-7m was trained with) and the transformers tokenizers.

Bounds on llama.cpp against our in-memory quantized model: llama.cpp's CPU matmuls round the
activations to 8 bits (Q8_0 / Q8_K) before multiplying them with quantized weights; our
in-memory model multiplies the same dequantized weights in float32. That costs about as much as
8-bit weights do, so the two are close but not equal. Measured (4 windows of 512 tokens):
pycode-7m Q4_K_M mean KL 0.0007, top-1 agreement 98.6%; SmolLM2 Q4_K_M 0.0058, 95.9%. Bounds:
pycode 0.002 / 97%, SmolLM2 0.012 / 93%.
"""

from __future__ import annotations

import json

import pytest
import quantfoundry as qf
import torch
from quantfoundry.data import default_eval_text
from quantfoundry.pipeline.evaluate import TOKENIZER_PROBES
from transformers import AutoModelForCausalLM, AutoTokenizer


def windows(tokenizer, text: str, n: int, ctx: int = 512) -> torch.Tensor:
    ids = tokenizer(text)["input_ids"][: n * ctx]
    assert len(ids) == n * ctx
    return torch.tensor(ids).view(n, ctx)


def kl_and_agreement(ref: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """Mean KL(ref || other) per position in float64, and the share of equal argmaxes."""
    p, q = ref.double().log_softmax(-1), other.double().log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1)
    return float(kl.mean()), float((ref.argmax(-1) == other.argmax(-1)).double().mean())


@pytest.fixture(scope="module")
def engine_cls(llama_cpp_python):
    from qf_gguf.engine import LlamaCppEngine

    return LlamaCppEngine


def test_f32_conversion_in_the_engine_equals_transformers(engine_cls, converted, smollm2, shared) -> None:
    """The engine's plumbing (one batch per window, every position's logits, KV cache dropped
    between windows) against transformers on the float model: llama.cpp's own F32 file."""
    tok = AutoTokenizer.from_pretrained(smollm2)
    ids = windows(tok, (shared / "data/wikitext-2-raw/wiki.test.raw").read_text()[:12_000], 2, 256)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    engine = engine_cls(converted(smollm2))
    try:
        got = engine.logits(ids)
        again = engine.logits(ids[1:])  # a fresh sequence: nothing left of the previous one
    finally:
        engine.close()
    kl, agree = kl_and_agreement(ref, got)
    assert kl < 1e-5 and agree == 1.0
    assert torch.equal(again[0], got[1])


@pytest.mark.parametrize(("model", "ftype", "max_kl", "min_agree"), [
    ("pycode-7m", "Q4_K_M", 0.002, 0.97),
    ("pycode-7m", "Q8_0", 0.001, 0.98),
    ("smollm2", "Q4_K_M", 0.012, 0.93),
])
def test_engine_logits_follow_the_in_memory_quantized_model(model, ftype, max_kl, min_agree, engine_cls,
                                                             smollm2, shared, tmp_path) -> None:
    folder = smollm2 if model == "smollm2" else shared / "models" / model
    text = (shared / "data/wikitext-2-raw/wiki.test.raw").read_text()[:20_000] if model == "smollm2" else \
        default_eval_text().read_text()[:20_000]
    r = qf.run(folder, exporter="gguf", exporter_options={"type": ftype}, out=tmp_path / "q", keep_model=True,
               evaluators=[], progress=False)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = windows(tok, text, 4)
    with torch.no_grad():
        mem = r.model.float()(input_ids=ids).logits
    engine = engine_cls(tmp_path / "q" / "model.gguf")
    try:
        got = engine.logits(ids)
    finally:
        engine.close()
    kl, agree = kl_and_agreement(mem, got)
    assert kl < max_kl and agree >= min_agree, (kl, agree)
    # the in-memory model carries the exporter's token_embd/output rounding too: without it
    # (the original's float embedding and head) it would stand further from llama.cpp
    orig = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        far, _ = kl_and_agreement(orig(input_ids=ids).logits, got)
    assert far > kl


def test_tokenizers_agree_and_pycode_follows_sentencepiece(engine_cls, smollm2, shared, tmp_path) -> None:
    import sentencepiece as spm

    for folder in (shared / "models" / "pycode-7m", smollm2):
        qf.run(folder, exporter="gguf", out=tmp_path / folder.name, evaluators=[], progress=False)
        tok = AutoTokenizer.from_pretrained(folder)
        engine = engine_cls(tmp_path / folder.name / "model.gguf")
        try:
            for text in TOKENIZER_PROBES:
                assert engine.tokenize(text) == tok(text)["input_ids"], (folder.name, text)
            if folder.name == "pycode-7m":
                # text starting with spaces: llama.cpp splits it as SentencePiece (which made the
                # training data) does; transformers' tokenizer drops one space of the dummy prefix
                sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
                for text in (" x", "  two leading spaces", "   indented = 1"):
                    assert engine.tokenize(text) == [sp.bos_id(), *sp.encode(text)]
        finally:
            engine.close()


def test_greedy_generation_stops_at_the_end_of_turn(engine_cls, smollm2, tmp_path) -> None:
    qf.run(smollm2, exporter="gguf", exporter_options={"type": "Q8_0"}, out=tmp_path / "q", evaluators=[],
           progress=False)
    tok = AutoTokenizer.from_pretrained(smollm2)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    engine = engine_cls(tmp_path / "q" / "model.gguf")
    try:
        new = engine.generate(prompt, 96)
        assert engine.is_eog(tok.eos_token_id) and not engine.is_eog(new[0])
    finally:
        engine.close()
    assert len(new) < 96 and new[-1] == tok.eos_token_id  # <|im_end|>, the chat template's turn end
    assert "Paris" in tok.decode(new)


def test_run_checks_the_artifact_in_llama_cpp_and_qf_eval_serves_it(engine_cls, tmp_path) -> None:
    from click.testing import CliRunner
    from quantfoundry.cli import cli

    r = qf.run(exporter="gguf", out=tmp_path / "q", progress=False,
               evaluators=[("perplexity", {"max_tokens": 4096}), ("kl", {"max_tokens": 4096})])
    ev = r.manifest["evaluation"]
    assert ev["artifact"]["opened"].startswith("served by llama.cpp")
    assert ev["artifact"]["tokenizer"] == {"probes": len(TOKENIZER_PROBES), "identical": len(TOKENIZER_PROBES)}
    assert ev["artifact_check"]["ok"], ev["artifact_check"]
    ppl = r.metrics["perplexity"]["perplexity"]
    assert ppl["artifact"] == pytest.approx(ppl["quantized"], rel=0.005)
    res = CliRunner().invoke(cli, ["eval", str(tmp_path / "q"), "--evaluator", "perplexity:max_tokens=4096"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "q" / "quantfoundry.json").read_text())
    art = manifest["artifact_evaluation"]
    assert art["metrics"]["perplexity"]["perplexity"]["artifact"] == pytest.approx(ppl["artifact"], rel=1e-6)
    assert art["tokenizer_mismatches"] == []


def test_without_llama_cpp_python_the_run_notes_it_and_qf_eval_says_how(tmp_path, monkeypatch) -> None:
    """No llama-cpp-python: transformers' GGUF reader checks the file and serves qf eval, and the
    notes say so; with no reader at all, qf eval says what to install."""
    import builtins

    from qf_gguf import reader
    from quantfoundry.errors import EngineUnavailable
    from quantfoundry.pipeline.evaluate import evaluate_artifact

    real_import = builtins.__import__

    def no_llama(name, *args, **kwargs):
        if name == "llama_cpp":
            raise ModuleNotFoundError("No module named 'llama_cpp'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_llama)
    r = qf.run(exporter="gguf", out=tmp_path / "q", progress=False, evaluators=[("perplexity", {"max_tokens": 1024})])
    served = [n for n in r.notes if n.startswith("artifact checked: served by transformers GGUF reader")]
    assert served and "llama-cpp-python is not installed: pip install 'qf-gguf[engine]'" in served[0], r.notes
    assert "artifact" in r.metrics["perplexity"]["perplexity"]
    assert evaluate_artifact(tmp_path / "q", evaluators=[("perplexity", {"max_tokens": 1024})]).metrics

    class NoReader(reader.TransformersGGUFEngine):
        def __init__(self, path, device="cpu", *, instead_of=""):
            raise EngineUnavailable(f"{instead_of}; transformers cannot read model.gguf either (test)")

    monkeypatch.setattr("qf_gguf.exporter.TransformersGGUFEngine", NoReader)
    with pytest.raises(EngineUnavailable, match=r"qf-gguf\[engine\].*transformers cannot read"):
        evaluate_artifact(tmp_path / "q", evaluators=[("perplexity", {})])

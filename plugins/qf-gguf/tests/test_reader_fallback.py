"""Issue 16.3: without llama-cpp-python the GGUF run still checks its file, through a second,
independent reader (transformers' GGUF loader: gguf-py's dequantizers, the file's own vocabulary)."""

from __future__ import annotations

import json

import pytest
import quantfoundry as qf
from qf_gguf import engine as engine_module
from qf_gguf.reader import TransformersGGUFEngine
from quantfoundry.data import default_model_path
from quantfoundry.errors import EngineUnavailable


@pytest.fixture
def no_llama_cpp(monkeypatch):
    def missing():
        raise EngineUnavailable(f"llama-cpp-python is not installed: {engine_module.INSTALL}")
    monkeypatch.setattr(engine_module, "import_llama_cpp", missing)


def test_gguf_run_is_checked_without_llama_cpp(no_llama_cpp, tmp_path) -> None:
    out = tmp_path / "o"
    result = qf.run(format="Q4_K_M", evaluators=[("kl", {"max_tokens": 4000}), "size"], out=out, progress=False)
    served = [n for n in result.notes if n.startswith("artifact checked: ")]
    assert served and "transformers GGUF reader" in served[0], result.notes
    assert "llama.cpp not used: llama-cpp-python is not installed" in served[0]
    assert not [n for n in result.notes if n.startswith("MISMATCH")], result.notes
    kl = result.metrics["kl"]
    # the file, dequantized by gguf-py, computes what the in-memory model computed
    assert kl["kl_mean"]["artifact"] == pytest.approx(kl["kl_mean"]["quantized"], rel=1e-3, abs=1e-6)
    assert kl["same_top1_pct"]["artifact"] == pytest.approx(kl["same_top1_pct"]["quantized"], abs=0.05)
    shipped = sum((out / f).stat().st_size for f in ("model.gguf", "Modelfile"))  # Ollama's Modelfile ships too
    assert result.metrics["size"]["artifact_bytes"]["artifact"] == shipped
    opened = json.loads((out / "quantfoundry.json").read_text())["evaluation"]["artifact"]["opened"]
    assert opened.startswith("served by transformers GGUF reader")


def test_the_files_tokenizer_is_read_back(tmp_path) -> None:
    """The reader's tokenizer is built from the GGUF's own vocabulary: it tokenizes like the source."""
    from transformers import AutoTokenizer

    out = tmp_path / "o"
    qf.run(format="Q8_0", exporter="gguf", evaluators=[], out=out, progress=False)
    reader = TransformersGGUFEngine(out / "model.gguf")
    text = "def main(argv=None):\n    return 0  # ok\n"
    assert reader.tokenize(text) == AutoTokenizer.from_pretrained(default_model_path())(text).input_ids
    reader.close()


def test_a_mixtral_gguf_read_as_a_dense_llama_is_not_a_check(no_llama_cpp, tiny_model, tmp_path) -> None:
    """llama.cpp writes Mixtral as architecture "llama" with ``llama.expert_count``; transformers'
    reader builds a dense LlamaForCausalLM from it, without the experts. That is no check of the
    file: the reader says so and the run reports no artifact figures (no false MISMATCH)."""
    folder = tiny_model("mixtral", hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                        intermediate_size=256)
    out = tmp_path / "o"
    result = qf.run(folder, format="Q8_0", exporter="gguf", evaluators=["perplexity"], out=out, progress=False,
                    calibrator_options={"n_samples": 2, "seq_len": 32})
    assert not [n for n in result.notes if n.startswith(("MISMATCH", "artifact checked"))], result.notes
    assert "artifact" not in result.metrics["perplexity"]["perplexity"]
    with pytest.raises(EngineUnavailable, match=r"as a 'llama' model without 6 of its weights \(model.layers.0.mlp.down_proj.weight"):
        TransformersGGUFEngine(out / "model.gguf")

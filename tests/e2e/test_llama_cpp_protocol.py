"""``perplexity protocol=llama.cpp`` against ``llama-perplexity`` itself, on the same model.

pycode-7m is converted to an F32 GGUF by llama.cpp's own ``convert_hf_to_gguf.py``; both tools
score the same text with the same context. Any difference in tokenization, BOS handling,
window cutting or the scored half would move the figure far beyond the bound.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from quantfoundry.builtin.perplexity import PerplexityEvaluator, PerplexityOptions
from quantfoundry.data import default_eval_text, default_model_path
from quantfoundry.pipeline.materialize import load_full_model
from quantfoundry.pipeline.source import resolve_model
from quantfoundry.roles.evaluator import EvalTarget

CTX = 256


@pytest.fixture(scope="module")
def f32_gguf(llama_cpp, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "pycode-7m-f32.gguf"
    r = subprocess.run([sys.executable, str(llama_cpp["src"] / "convert_hf_to_gguf.py"), str(default_model_path()),
                        "--outtype", "f32", "--outfile", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def llama_perplexity(llama_cpp, gguf, text_file, ctx: int) -> tuple[float, int]:
    r = subprocess.run([str(llama_cpp["bin"] / "llama-perplexity"), "-m", str(gguf), "-f", str(text_file),
                        "-c", str(ctx), "-b", str(ctx), "-t", "2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stdout + r.stderr
    ppl = float(re.search(r"Final estimate: PPL = ([0-9.]+)", log).group(1))
    chunks = int(re.search(r"calculating perplexity over (\d+) chunks", log).group(1))
    return ppl, chunks


def test_llama_cpp_protocol_matches_llama_perplexity(llama_cpp, f32_gguf, tmp_path) -> None:
    text = tmp_path / "eval.txt"
    text.write_text(default_eval_text().read_text()[:60_000])
    want, chunks = llama_perplexity(llama_cpp, f32_gguf, text, CTX)
    source = resolve_model(default_model_path())
    model = load_full_model(source, dtype=torch.float32, device=torch.device("cpu"))
    target = EvalTarget(model, source.tokenizer(), source, "original", torch.device("cpu"))
    got = PerplexityEvaluator(PerplexityOptions(path=text, protocol="llama.cpp", ctx=CTX,
                                                max_tokens=10**9)).evaluate(target)
    assert got["tokens"] == chunks * (CTX - 1 - CTX // 2)  # the second half of each window, as llama.cpp
    assert got["perplexity"] == pytest.approx(want, abs=2e-4)  # llama.cpp prints 4 decimals
    core = PerplexityEvaluator(PerplexityOptions(path=text, ctx=CTX, max_tokens=10**9)).evaluate(target)
    assert abs(core["perplexity"] - want) > 0.05  # the two protocols really differ

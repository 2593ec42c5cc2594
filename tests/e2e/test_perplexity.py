"""The perplexity protocol against a direct transformers computation written here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from quantfoundry import EvalTarget, resolve_model
from quantfoundry.builtin.perplexity import PerplexityEvaluator, PerplexityOptions
from quantfoundry.data import default_eval_text, default_model_path
from quantfoundry.toolkit import load_full_model


def direct_perplexity(model_dir, text: str, window: int, max_tokens: int) -> tuple[float, int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"][:max_tokens]
    nll, n = 0.0, 0
    for start in range(0, len(ids), window):
        w = torch.tensor([ids[start:start + window]])
        if w.shape[1] < 2:
            continue
        with torch.no_grad():
            logits = model(w).logits[0].double()
        nll += float(F.cross_entropy(logits[:-1], w[0, 1:], reduction="sum"))
        n += w.shape[1] - 1
    return math.exp(nll / n), n


@pytest.mark.parametrize(("window", "max_tokens"), [(0, 50_000), (300, 4_001)])
def test_perplexity_equals_direct_transformers(window: int, max_tokens: int) -> None:
    path = default_model_path()
    source = resolve_model(path)
    model = load_full_model(source, dtype=torch.float32, device=torch.device("cpu"))
    ev = PerplexityEvaluator(PerplexityOptions(ctx=window, max_tokens=max_tokens, batch_size=3))
    got = ev.evaluate(EvalTarget(model, source.tokenizer(), source, "original", torch.device("cpu")))
    ref, n = direct_perplexity(path, default_eval_text().read_text(), window or 1024, max_tokens)
    assert got["tokens"] == n
    assert got["perplexity"] == pytest.approx(ref, rel=1e-5)
    if window == 0:
        assert n == 49_951  # 48 windows of 1024 and one of 848, 1 token unscored each
        assert got["perplexity"] == pytest.approx(6.640, abs=0.005)  # pycode-7m SOURCE.md

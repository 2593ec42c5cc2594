"""Issue 16.5: perplexity names the text it scored; a model other than the default one is
scored on a general-English text, with a warning to pass its own."""

from __future__ import annotations

from pathlib import Path

import quantfoundry as qf
from click.testing import CliRunner
from quantfoundry.cli import cli
from quantfoundry.data import english_eval_text

SHARED = Path(__file__).resolve().parents[2].parent / "shared"


def test_english_text_is_a_licensed_wikitext_excerpt() -> None:
    text = english_eval_text().read_text(encoding="utf-8")
    whole = (SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")
    assert len(text) == 295_858 and whole.startswith(text)
    licence = (english_eval_text().parent / "LICENSE-CC-BY-SA-3.0.txt").read_text()
    assert "CC BY-SA 3.0" in licence and "https://creativecommons.org/licenses/by-sa/3.0/legalcode" in licence


def test_other_models_score_english_and_are_warned(tiny_model, tmp_path) -> None:
    r = CliRunner().invoke(cli, ["run", "--no-progress", "--model", str(tiny_model("llama")), "--out",
                                 str(tmp_path / "o"), "--evaluator", "perplexity:max_tokens=3000"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())  # the table's caption wraps
    assert "perplexity scored the embedded general-English text (a WikiText-2 excerpt)" in text
    assert "--evaluator-opt path=FILE" in text
    assert "perplexity: scored on english_eval.txt (embedded, WikiText-2 English), core protocol" in text


def test_the_default_model_scores_python_without_a_warning(tmp_path) -> None:
    result = qf.run(format="int8", evaluators=[("perplexity", {"max_tokens": 3000})], out=None, progress=False)
    assert result.metrics["perplexity"]["text"]["quantized"] == "python_eval.txt (embedded, Python code)"
    assert not [n for n in result.notes if "general-English" in n]


def test_a_passed_text_is_named(tiny_model, tmp_path) -> None:
    story = tmp_path / "stories.txt"
    story.write_text((SHARED / "data" / "tinystories-valid-excerpt" / "tinystories_valid_excerpt.txt").read_text())
    result = qf.run(tiny_model("llama"), evaluators=[("perplexity", {"path": str(story)})], out=None, progress=False)
    assert result.metrics["perplexity"]["text"]["quantized"] == "stories.txt"
    assert not [n for n in result.notes if "general-English" in n]

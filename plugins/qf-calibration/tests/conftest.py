"""Fixtures of qf-calibration's tests: real tokenizers (one with a chat template, one without)
and a JSONL writer."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smol_tokenizer(shared):
    """SmolLM2-135M-Instruct's tokenizer and ChatML template (its folder holds no weights: none needed)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shared / "models" / "smollm2-135m-instruct-q4_1-dequant")


@pytest.fixture(scope="session")
def pycode_tokenizer():
    """pycode-7m's tokenizer: no chat template."""
    from quantfoundry.data import default_model_path
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_path())


@pytest.fixture
def jsonl(tmp_path):
    """``jsonl(records, name="data.jsonl")`` writes records one per line and returns the path."""
    import json

    def write(records: list, name: str = "data.jsonl") -> Path:
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        return path

    return write

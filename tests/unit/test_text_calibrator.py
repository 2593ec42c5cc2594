from __future__ import annotations

import json

import pytest
import torch
from quantfoundry.builtin.text_calibrator import TextCalibrator, TextCalibratorOptions
from quantfoundry.data import default_calibration_text, default_eval_text, default_model_path
from quantfoundry.errors import UsageError


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_path())


def test_default_text_windows_are_seeded_slices(tok) -> None:
    a = TextCalibrator(TextCalibratorOptions(n_samples=16, seq_len=64, seed=3)).load(tok)
    b = TextCalibrator(TextCalibratorOptions(n_samples=16, seq_len=64, seed=3)).load(tok)
    c = TextCalibrator(TextCalibratorOptions(n_samples=16, seq_len=64, seed=4)).load(tok)
    assert a.input_ids.shape == (16, 64) and torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, c.input_ids)
    ids = tok(default_calibration_text().read_text(), add_special_tokens=False, verbose=False)["input_ids"]
    text = " ".join(map(str, ids))
    for row in a.input_ids.tolist():
        assert " ".join(map(str, row)) in text  # each window is a contiguous slice of the text
    assert a.info["text_tokens"] == len(ids) and not a.info["warnings"]
    assert tok.bos_token_id not in a.input_ids[:, 0].tolist()


def test_jsonl_and_bos(tok, tmp_path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n"}) for i in range(50)))
    cal = TextCalibrator(TextCalibratorOptions(path=path, n_samples=4, seq_len=32, add_bos=True)).load(tok)
    assert cal.input_ids.shape == (4, 32) and (cal.input_ids[:, 0] == tok.bos_token_id).all()
    assert cal.source == str(path) and len(cal.sha256) == 64


def test_bad_jsonl_and_missing_file(tok, tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": "x"}\n')
    with pytest.raises(UsageError, match="bad.jsonl:1 has no string field 'text'"):
        TextCalibrator(TextCalibratorOptions(path=bad)).load(tok)
    with pytest.raises(UsageError, match="does not exist"):
        TextCalibrator(TextCalibratorOptions(path=tmp_path / "none.txt")).load(tok)


def test_embedded_texts_are_disjoint() -> None:
    calib = default_calibration_text().read_text()
    evalt = default_eval_text().read_text()
    files = lambda t: {ln for ln in t.splitlines() if ln.startswith("# ===== file: ")}  # noqa: E731
    assert files(calib) and files(evalt) and not files(calib) & files(evalt)

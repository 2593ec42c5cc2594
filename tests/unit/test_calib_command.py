"""``qf calib``: the calibration a run would use, counted and shown, without reading weights."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner
from quantfoundry.cli import cli
from quantfoundry.data import default_calibration_text, default_model_path
from quantfoundry.pipeline.components import make
from transformers import AutoTokenizer


def test_the_default_text_calibration(tmp_path) -> None:
    r = CliRunner().invoke(cli, ["calib", "--calibrator-opt", "n_samples=16", "--calibrator-opt", "seq_len=64"])
    assert r.exit_code == 0, r.output
    tok = AutoTokenizer.from_pretrained(default_model_path())
    cal = make("calibrator", "text", {"n_samples": "16", "seq_len": "64"}).load(tok)
    assert "calibrator: text (built-in)" in r.output
    assert f"source: {default_calibration_text()}" in r.output
    assert "samples: 16  tokens: 1,024  length min/mean/max: 64 / 64.0 / 64" in r.output
    assert f"sha256 of the token ids: {cal.ids_sha256}" in r.output
    first = tok.decode(cal.input_ids[0].tolist(), skip_special_tokens=False)
    assert f"--- sample 1 of 16 (64 tokens) ---\n{first}" in r.output


def test_json_figures_and_histogram(tmp_path) -> None:
    r = CliRunner().invoke(cli, ["calib", "--json", "--calibrator-opt", "n_samples=5", "--calibrator-opt",
                                 "seq_len=32"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["samples"] == 5 and d["tokens"] == 160 and d["histogram"] == [{"low": 32, "high": 32, "count": 5}]
    assert len(d["ids_sha256"]) == 64 and d["calibrator"] == "text"


def test_lengths_histogram_bins_cover_every_sample() -> None:
    from quantfoundry import CalibrationSet
    from quantfoundry.pipeline.preview import CalibrationPreview

    seqs = [torch.arange(n) for n in (3, 10, 10, 17, 40, 41)]
    p = CalibrationPreview("x", "built-in", "m", CalibrationSet.from_sequences(seqs, "s"), None)
    hist = p.histogram(bins=4)
    assert hist[0][0] == 3 and hist[-1][1] == 41 and sum(n for _, _, n in hist) == 6
    assert all(a <= b for a, b, _ in hist) and all(hist[i][1] + 1 == hist[i + 1][0] for i in range(len(hist) - 1))


def test_bad_options_and_files_are_one_line(tmp_path) -> None:
    r = CliRunner().invoke(cli, ["calib", "--calibrator-opt", f"path={tmp_path / 'missing.txt'}"])
    assert r.exit_code == 2 and "does not exist" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(cli, ["calib", "--model", str(tmp_path / "nowhere")])
    assert r.exit_code == 2 and "does not exist" in r.output

"""Issue 16.1: every file an option names is checked before the model is loaded."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from quantfoundry.cli import cli
from quantfoundry.pipeline import stages


@pytest.fixture
def no_model_work(monkeypatch):
    """Fail the test if the run gets as far as opening the model."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was opened before the bad option was refused")
    monkeypatch.setattr(stages, "resolve_model", refuse)


@pytest.mark.parametrize("args,key", [
    # the user's step: a late evaluator check threw a minute of GPTQ away
    (["--quantizer", "gptq", "--evaluator", "perplexity", "--evaluator-opt", "path=wiki.test.raw"], "'path'"),
    (["--evaluator", "perplexity:path=wiki.test.raw"], "'path'"),
    # rtn needs no calibration, but a mistyped calibration file is still a mistake
    (["--calibrator-opt", "path=MISSING.txt"], "'path'"),
    (["--exporter", "gguf", "--exporter-opt", "imatrix=missing.imatrix"], "'imatrix'"),
    (["--evaluator", "calibration-mismatch:out_domain=nope.txt"], "'out_domain'"),
])
def test_missing_files_stop_before_the_model(args, key, no_model_work, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli, ["run", "--no-progress", "--out", "o", *args])
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2, r.output
    assert len(lines) == 1 and lines[0].startswith("Error: option " + key), r.output
    assert "does not exist" in lines[0] and "Traceback" not in r.output
    assert not (tmp_path / "o").exists()


def test_missing_file_in_a_recipe(no_model_work, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.toml").write_text('[quantizer]\nname = "rtn"\n[[evaluator]]\nname = "perplexity"\n'
                                     'path = "wiki.test.raw"\n')
    r = CliRunner().invoke(cli, ["run", "--no-progress", "--recipe", "r.toml", "--out", "o"])
    assert r.exit_code == 2 and "wiki.test.raw does not exist" in r.output, r.output


def test_missing_file_for_eval_and_compare(no_model_work, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli, ["compare", "-f", "int8", "--evaluator-opt", "path=nope.txt",
                                 "--evaluator", "perplexity", "--out", "cmp"])
    assert r.exit_code == 2 and "nope.txt does not exist" in r.output, r.output

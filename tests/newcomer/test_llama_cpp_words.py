"""Issue 16.6: llama.cpp's words work — ``--format Q4_K_M``, file-type names, folders and
``general.name`` named after the model and the file type."""

from __future__ import annotations

import gguf
from click.testing import CliRunner
from quantfoundry.cli import cli


def test_format_q4_k_m_writes_the_gguf_file_type(tiny_model, tmp_path, monkeypatch) -> None:
    model = tiny_model("llama")
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli, ["run", "--no-progress", "--no-eval", "--model", str(model), "--format", "Q4_K_M"])
    assert r.exit_code == 0, r.output
    assert "--format Q4_K_M is a preset of exporter 'gguf'" in r.output
    folder = tmp_path / "qf-out" / "tiny-llama-rtn-Q4_K_M"  # not ...-default
    reader = gguf.GGUFReader(folder / "model.gguf")
    assert reader.fields["general.name"].contents() == "tiny-llama"
    assert reader.fields["general.file_type"].contents() == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    shown = CliRunner().invoke(cli, ["inspect", str(folder)])
    assert shown.exit_code == 0 and "Q4_K_M (15)" in shown.output, shown.output
    # again: a second folder, never the first one replaced
    r = CliRunner().invoke(cli, ["run", "--no-progress", "--no-eval", "--model", str(model),
                                 "--exporter", "gguf", "--exporter-opt", "type=q4_k_m"])
    assert r.exit_code == 0 and (tmp_path / "qf-out" / "tiny-llama-rtn-Q4_K_M-2").is_dir(), r.output


def test_a_file_type_for_another_exporter_says_what_to_type(tmp_path) -> None:
    r = CliRunner().invoke(cli, ["run", "--no-progress", "--format", "q4_k_m", "--exporter", "hf-gptq",
                                 "--out", str(tmp_path / "o")])
    assert r.exit_code == 2
    assert r.output.strip() == ("Error: 'q4_k_m' is no format: exporter 'hf-gptq' has no preset 'q4_k_m'; "
                                "type --exporter gguf --exporter-opt type=Q4_K_M")


def test_conflicting_file_types_are_refused(tmp_path) -> None:
    r = CliRunner().invoke(cli, ["run", "--no-progress", "--format", "Q4_K_M", "--exporter-opt", "type=Q6_K",
                                 "--exporter", "gguf", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "keep one of them" in r.output, r.output


def test_unknown_names_are_still_unknown(tmp_path) -> None:
    r = CliRunner().invoke(cli, ["run", "--no-progress", "--format", "Q4_K_X", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "unknown format 'Q4_K_X'" in r.output


def test_the_default_model_is_named_pycode_7m(tmp_path, monkeypatch) -> None:
    """Folders and GGUF general.name say pycode-7m, the embedded model's name."""
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli, ["run", "--no-progress", "--no-eval", "--format", "Q8_0", "--exporter", "gguf"])
    assert r.exit_code == 0, r.output
    reader = gguf.GGUFReader(tmp_path / "qf-out" / "pycode-7m-rtn-Q8_0" / "model.gguf")
    assert reader.fields["general.name"].contents() == "pycode-7m"

"""``--target ENGINE``: the exporter, format and quantizer each engine reads best, said with the
reason, and every one of them overridable by its own flag."""

from __future__ import annotations

import pytest
from quantfoundry.deploy.targets import TARGETS
from quantfoundry.errors import UsageError
from quantfoundry.pipeline.stages import RunRequest, resolve

WANT = {"llama.cpp": ("gguf", None, "rtn", "Q4_K_M"), "ollama": ("gguf", None, "rtn", "Q4_K_M"),
        "vllm": ("hf-gptq", "int4-g128-sym", "gptq", None), "tgi": ("hf-gptq", "int4-g128-sym", "gptq", None),
        "transformers": ("hf-gptq", "int4-g128-sym", "gptq", None), "qlora": ("bnb-4bit", "nf4-dq", "rtn", None)}


@pytest.mark.parametrize("name", list(TARGETS))
def test_each_target_routes_to_its_engines_format(name):
    notes: list[str] = []
    state = resolve(RunRequest(target=name, report=notes.append))
    exporter, spec, quantizer, file_type = WANT[name]
    assert state.exporter.name == exporter and state.quantizer.name == quantizer
    if spec is not None:
        assert state.requested is not None and state.requested.spec == spec
    else:  # a llama.cpp file type: a preset of the gguf exporter
        assert state.requested is None and state.exporter.options.type == file_type
    assert any(n.startswith(f"--target {name}:") and " — " in n for n in notes), notes


def test_explicit_choices_win_and_are_kept():
    notes: list[str] = []
    state = resolve(RunRequest(target="vllm", exporter="compressed-tensors", format="fp8-e4m3", activations="fp8",
                               quantizer="rtn", report=notes.append))
    assert state.exporter.name == "compressed-tensors" and state.requested.spec == "fp8-e4m3"
    assert state.quantizer.name == "rtn"
    assert notes and "every choice was given" in notes[0]
    state = resolve(RunRequest(target="llama.cpp", format="Q5_K_M", report=notes.append))
    assert state.exporter.name == "gguf" and state.exporter.options.type == "Q5_K_M"


def test_an_unknown_target_names_the_known_ones():
    with pytest.raises(UsageError, match="choose one of llama.cpp, ollama, vllm"):
        resolve(RunRequest(target="mlc"))


def test_the_cli_names_the_default_folder_after_the_targets_choice(tmp_path, monkeypatch):
    from click.testing import CliRunner
    from quantfoundry.cli import cli

    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(cli, ["run", "--target", "llama.cpp", "--no-eval"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "qf-out" / "pycode-7m-rtn-Q4_K_M" / "model.gguf").is_file()

"""Each refusal of the loader and the pipeline is one clear line, before any artifact exists."""

from __future__ import annotations

import json
import shutil

import pytest
import quantfoundry as qf
import torch
from click.testing import CliRunner
from quantfoundry.cli import cli
from quantfoundry.errors import (
    AlreadyQuantizedError,
    ArtifactError,
    ModelLoadError,
    NonFiniteWeightsError,
    UnsupportedArchitectureError,
)
from safetensors.torch import load_file, save_file


def run_cli(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(cli, ["run", "--no-progress", *args])
    return r.exit_code, r.output


def assert_one_line(output: str, fragment: str) -> None:
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, output
    assert lines[0].startswith("Error: ") and fragment in lines[0], output
    assert "Traceback" not in output


def test_missing_folder(tmp_path) -> None:
    code, out = run_cli("--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert code == 2
    assert_one_line(out, "does not exist")


def test_folder_without_config(tmp_path) -> None:
    code, out = run_cli("--model", str(tmp_path), "--out", str(tmp_path / "o"))
    assert_one_line(out, "has no config.json")


def test_already_quantized(tiny_model, tmp_path) -> None:
    folder = tiny_model("llama")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(AlreadyQuantizedError, match=r"already quantized \(gptq\)"):
        qf.run(str(folder), out=None, progress=False)
    code, out = run_cli("--model", str(folder), "--out", str(tmp_path / "o"))
    assert code == 2
    assert_one_line(out, "quantize the original fp16/bf16 checkpoint instead")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("bad,tensor", [(float("nan"), "model.layers.1.mlp.up_proj.weight"),
                                        (float("inf"), "model.layers.1.mlp.up_proj.weight"),
                                        (float("nan"), "model.embed_tokens.weight"),
                                        (float("-inf"), "model.norm.weight")])
def test_non_finite_weights(tiny_model, tmp_path, bad: float, tensor: str) -> None:
    """Outside the blocks checked before any work; a block's tensors as the loop reads them."""
    folder = tiny_model("llama")
    state = load_file(str(folder / "model.safetensors"))
    state[tensor].view(-1)[5] = bad
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(NonFiniteWeightsError, match=f"{tensor} .* holds 1 NaN/Inf"):
        qf.run(str(folder), out=tmp_path / "o", progress=False)
    code, out = run_cli("--model", str(folder), "--out", str(tmp_path / "o"))
    assert_one_line(out, "NaN/Inf")
    assert not (tmp_path / "o").exists()


def test_pickle_refused_unless_allowed(tiny_model, tmp_path) -> None:
    folder = tiny_model("llama")
    state = load_file(str(folder / "model.safetensors"))
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    code, out = run_cli("--model", str(folder), "--out", str(tmp_path / "o"), "--no-eval")
    assert_one_line(out, "--allow-pickle")
    result = qf.run(str(folder), allow_pickle=True, format="int8", out=tmp_path / "o", progress=False)
    assert result.artifact is not None and (result.artifact / "model.safetensors").is_file()


def test_unsupported_architecture(tiny_model, tmp_path) -> None:
    folder = tiny_model("llama")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match="supported: .*LlamaForCausalLM"):
        qf.run(str(folder), out=None, progress=False)


def test_missing_weights(tiny_model, tmp_path) -> None:
    folder = tiny_model("llama")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="has no \\*.safetensors weights"):
        qf.run(str(folder), out=None, progress=False)


def test_unknown_hub_id_offline(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out = run_cli("--model", "no-such-org/no-such-model", "--out", str(tmp_path / "o"))
    assert code == 2
    assert_one_line(out, "cannot fetch no-such-org/no-such-model from the Hugging Face Hub")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--quantizer", "gtpq"], "unknown quantizer 'gtpq'"),
        (["--quantizer-opt", "bits=4"], "unknown option 'bits' for quantizer 'rtn'; valid options: (none)"),
        (["--format", "int4-g128", "--format-opt", "bits=x"], "option 'bits' for format 'int4-g128': expected int"),
        (["--format", "int9"], "bits must be between 1 and 8, got 9"),
        (["--exporter-opt", "shard_mb=0"], "shard_mb must be >= 1"),
        (["--calibrator-opt", "n_samples=-1"], "n_samples must be >= 1"),
        (["--evaluator-opt", "path=x"], "prefix the key with one of perplexity, size"),
        (["--evaluator", "perplexity", "--evaluator-opt", "windw=3"], "unknown option 'windw' for evaluator"),
        (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], "device"),
        (["--kernel", "nope"], "unknown kernel 'nope'"),
    ],
)
def test_option_errors_are_one_line(args, fragment, tmp_path) -> None:
    code, out = run_cli(*args, "--out", str(tmp_path / "o"))
    assert code == 2
    assert_one_line(out, fragment)
    assert not (tmp_path / "o").exists()


def test_bad_recipe(tmp_path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text('modle = "x"\n')
    code, out = run_cli("--recipe", str(recipe))
    assert_one_line(out, "unknown recipe key 'modle'")


def test_existing_output_needs_overwrite(tmp_path) -> None:
    (tmp_path / "o").mkdir()
    code, out = run_cli("--out", str(tmp_path / "o"))
    assert_one_line(out, "already exists; pass --overwrite")


def test_a_failed_export_leaves_no_artifact_and_resumes(register_plugin, tmp_path) -> None:
    """A crash while writing (disk full) leaves no half-written artifact; the quantized blocks
    stay in the run's journal, which the same run with resume=True writes out."""
    full = {"disk": True}

    class Failing(qf.Exporter):
        name = "failing"
        default_format = "int8"

        def begin(self, folder, source, plan):
            (folder / "partial.bin").write_bytes(b"x")

        def write(self, name, tensor):
            if "layers.3" in name and full["disk"]:
                raise OSError("disk full")

        def finish(self, manifest):
            return {}

    class P:
        @qf.hookimpl
        def qf_register_exporters(self, register):
            register(Failing)

    register_plugin(P(), "failing")
    lines: list[str] = []
    with pytest.raises(OSError, match="disk full"):
        qf.run(exporter="failing", out=tmp_path / "out", progress=False, report=lines.append)
    assert [p.name.split("-")[0] for p in tmp_path.iterdir()] == [".out.partial"]  # no artifact, no temporary
    assert "keeps 6 finished block(s)" in lines[-1] and "--resume" in lines[-1]
    full["disk"] = False
    qf.run(exporter="failing", out=tmp_path / "out", progress=False, resume=True, report=lines.append)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_refused_export_leaves_nothing_behind(register_plugin, tmp_path) -> None:
    """An error of the inputs (the exporter refuses a tensor) fails the same way on a rerun:
    nothing is kept, not even the journal."""
    class Refusing(qf.Exporter):
        name = "refusing"
        default_format = "int8"

        def begin(self, folder, source, plan):
            pass

        def write(self, name, tensor):
            if "layers.3" in name:
                raise ArtifactError(f"{name} cannot be stored")

        def finish(self, manifest):
            return {}

    class P:
        @qf.hookimpl
        def qf_register_exporters(self, register):
            register(Refusing)

    register_plugin(P(), "refusing")
    with pytest.raises(ArtifactError, match="cannot be stored"):
        qf.run(exporter="refusing", out=tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_incompatible_exporter_is_refused_before_work(register_plugin, tmp_path) -> None:
    class Picky(qf.Exporter):
        name = "picky"

        def check_format(self, fmt):
            return None if fmt.options.bits == 8 else "it stores 8-bit only"

        def storable(self):
            return "int8 (any group size)"

        def begin(self, folder, source, plan):
            raise AssertionError("no work may start")

        write = finish = begin

    class P:
        @qf.hookimpl
        def qf_register_exporters(self, register):
            register(Picky)

    register_plugin(P(), "picky")
    with pytest.raises(qf.QFError, match="exporter 'picky' cannot store int4-g128: it stores 8-bit only; it stores int8"):
        qf.run(exporter="picky", format="int4-g128", out=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    shutil.rmtree(tmp_path, ignore_errors=True)

"""speed, calibration-mismatch, the artifact check, engine-served artifacts and ``qf compare``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import quantfoundry as qf
import torch
from click.testing import CliRunner
from quantfoundry import Engine, QuantLinear
from quantfoundry.builtin.qf_exporter import QFExporter
from quantfoundry.cli import cli
from quantfoundry.data import default_eval_text
from quantfoundry.errors import OptionsError, UsageError
from quantfoundry.hookspecs import hookimpl

SMALL = {"ctx": 64, "max_tokens": 600}


def test_speed_reports_both_models(tiny_model) -> None:
    r = qf.run(tiny_model("llama"), format="int4-g32", out=None, progress=False,
               evaluators=[("speed", {"prompt_tokens": 16, "new_tokens": 4, "repeats": 2, "warmup": 0})])
    s = r.metrics["speed"]
    for col in ("original", "quantized"):
        for key in ("prefill_tok_s", "decode_tok_s", "weights_mib"):
            assert math.isfinite(s[key][col]) and s[key][col] > 0, (key, col)
        assert s["peak_mib"][col] >= s["weights_mib"][col]
    assert s["weights_mib"]["quantized"] < s["weights_mib"]["original"]
    assert s["kernels"] == {"quantized": "torch-dequant"}  # the original has no quantized linears


def test_speed_decodes_several_batch_sizes(tiny_model) -> None:
    r = qf.run(tiny_model("llama"), format="int4-g32", out=None, progress=False,
               evaluators=[("speed", {"prompt_tokens": 8, "new_tokens": 3, "repeats": 1, "warmup": 0,
                                      "batch_sizes": "1,3"})])
    s = r.metrics["speed"]
    for col in ("original", "quantized"):
        assert math.isfinite(s["decode_tok_s@b3"][col]) and s["decode_tok_s@b3"][col] > 0
    assert "decode_tok_s@b1" not in s  # batch 1 is decode_tok_s
    with pytest.raises(OptionsError, match="batch_sizes"):
        qf.run(tiny_model("llama"), format="int4-g32", out=None, progress=False,
               evaluators=[("speed", {"batch_sizes": "1,x"})])


def test_speed_decodes_over_a_static_cache(tiny_model) -> None:
    r = qf.run(tiny_model("llama"), format="int4-g32", out=None, progress=False,
               evaluators=[("speed", {"prompt_tokens": 8, "new_tokens": 3, "repeats": 1, "warmup": 0,
                                      "decode": "static", "batch_sizes": "1,2"})])
    s = r.metrics["speed"]
    assert s["decode_mode"] == {"original": "static", "quantized": "static"}
    assert s["decode_tok_s@b2"]["quantized"] > 0
    # CPU runs decode eagerly by default; CUDA graphs are refused on CPU with the way out
    r = qf.run(tiny_model("llama"), format="int4-g32", out=None, progress=False,
               evaluators=[("speed", {"prompt_tokens": 8, "new_tokens": 2, "repeats": 1, "warmup": 0})])
    assert r.metrics["speed"]["decode_mode"]["quantized"] == "eager"
    with pytest.raises(UsageError, match="evaluator .speed.: decode=graph needs a CUDA device.*decode=static"):
        qf.run(tiny_model("llama"), format="int4-g32", out=None, progress=False,
               evaluators=[("speed", {"decode": "graph", "repeats": 1})])
    with pytest.raises(OptionsError, match="decode must be one of"):
        qf.run(tiny_model("llama"), format="int4-g32", out=None, progress=False,
               evaluators=[("speed", {"decode": "fast"})])


def test_calibration_mismatch_reports_both_domains(tiny_model, tmp_path) -> None:
    folder = tiny_model("llama")
    other = tmp_path / "prose.txt"
    other.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    r = qf.run(folder, format="int3-g32", out=None, progress=False, evaluators=[
        ("calibration-mismatch", {"out_domain": str(other), **SMALL}),
        ("kl", {"path": str(other), **SMALL}), ("kl", {"path": str(default_eval_text()), **SMALL})])
    m = {k: v["quantized"] for k, v in r.metrics["calibration-mismatch"].items()}
    assert m["in_text"] == f"{default_eval_text().name} (embedded, Python code)" and m["out_text"] == "prose.txt"
    # the same figures as the kl evaluator on each text on its own
    assert m["out_kl_mean"] == pytest.approx(r.metrics["kl[path=prose.txt]"]["kl_mean"]["quantized"], rel=1e-12)
    assert m["in_kl_mean"] == pytest.approx(r.metrics["kl[path=python_eval.txt]"]["kl_mean"]["quantized"], rel=1e-12)
    assert m["out_in_kl_ratio"] == pytest.approx(m["out_kl_mean"] / m["in_kl_mean"])
    assert "out-of-domain damage" in m["verdict"]


def test_repeated_evaluators_are_told_apart_in_the_summary(tiny_model, tmp_path) -> None:
    r = CliRunner().invoke(cli, ["run", "--model", str(tiny_model("llama")), "--format", "int8", "--no-artifact-eval",
                                 "--out", str(tmp_path / "o"),
                                 "--evaluator", "perplexity:ctx=64,max_tokens=300",
                                 "--evaluator", "perplexity:ctx=64,max_tokens=300,protocol=llama.cpp"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "perplexity[protocol=core].perplexity" in r.output
    assert "perplexity[protocol=llama.cpp].perplexity" in r.output


def test_calibration_mismatch_needs_an_out_domain_text() -> None:
    r = CliRunner().invoke(cli, ["run", "--evaluator", "calibration-mismatch", "--no-progress"])
    assert r.exit_code == 2
    assert r.output.count("\n") == 1 and "out_domain is required" in r.output


class LossyExporter(QFExporter):
    """The qf exporter with a reload that loses precision (as a buggy exporter would)."""

    name = "lossy-qf"

    def load(self, folder, device, kernel=None, dtype=torch.float32):
        model = super().load(folder, device, kernel, dtype)
        for mod in model.modules():
            if isinstance(mod, QuantLinear):
                for p in mod.qweight.params.values():
                    if p.is_floating_point():
                        p.mul_(1.3)
        return model


class TorchEngine(Engine):
    """A stand-in engine: serves the artifact's logits without exposing a torch module."""

    name = "test-engine"
    version = "1.0"

    def __init__(self, folder: Path, device: torch.device):
        self.model = QFExporter.load(QFExporter(QFExporter.Options()), folder, device)
        self.folder = folder
        self.closed = False

    def logits(self, input_ids):
        with torch.no_grad():
            return self.model(input_ids=input_ids).logits.float()

    def artifact_bytes(self):
        return sum(p.stat().st_size for p in self.folder.rglob("*") if p.is_file())

    def close(self):
        self.closed = True


class EngineExporter(QFExporter):
    name = "engine-qf"
    can_load = False  # served by an engine only

    def engine(self, folder, device):
        return TorchEngine(folder, device)


class BuggyLoader(QFExporter):
    """Says it can load, and its loader has a bug that raises NotImplementedError deep inside."""

    name = "buggy-loader"

    def load(self, folder, device, kernel=None, dtype=torch.float32):
        raise NotImplementedError("a helper the loader calls is unfinished")


class _Plugin:
    @hookimpl
    def qf_register_exporters(self, register):
        register(LossyExporter)
        register(EngineExporter)
        register(BuggyLoader)


def test_a_lossy_export_is_flagged(tiny_model, tmp_path, register_plugin) -> None:
    register_plugin(_Plugin(), "test-exporters")
    folder = tiny_model("llama")
    evals = [("perplexity", SMALL), ("kl", SMALL)]
    good = qf.run(folder, format="int4-g32", out=tmp_path / "good", evaluators=evals, progress=False)
    assert good.manifest["evaluation"]["artifact_check"]["ok"]
    assert good.metrics["kl"]["kl_mean"]["artifact"] == good.metrics["kl"]["kl_mean"]["quantized"]
    bad = qf.run(folder, format="int4-g32", exporter="lossy-qf", out=tmp_path / "bad", evaluators=evals,
                 progress=False)
    check = json.loads((tmp_path / "bad" / "quantfoundry.json").read_text())["evaluation"]["artifact_check"]
    assert not check["ok"] and any(m.startswith("kl.") for m in check["mismatches"])
    assert any(n.startswith("MISMATCH") and "kl." in n for n in bad.notes)


def test_qf_eval_through_an_engine(tiny_model, tmp_path, register_plugin) -> None:
    register_plugin(_Plugin(), "test-exporters")
    folder = tiny_model("llama")
    out = tmp_path / "art"
    mem = qf.run(folder, format="int4-g32", exporter="engine-qf", out=out, progress=False,
                 evaluators=[("kl", SMALL), ("size", {})])
    assert mem.manifest["evaluation"]["artifact"]["opened"] == "served by test-engine 1.0"
    r = CliRunner().invoke(cli, ["eval", str(out), "--evaluator", "kl:ctx=64,max_tokens=600",
                                 "--evaluator", "size"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    m = json.loads((out / "quantfoundry.json").read_text())["artifact_evaluation"]
    assert m["artifact"]["opened"] == "served by test-engine 1.0"
    kl = m["metrics"]["kl"]["kl_mean"]["artifact"]
    assert kl == pytest.approx(mem.metrics["kl"]["kl_mean"]["quantized"], rel=1e-9) and kl > 0
    weights = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    assert weights > 0 and m["metrics"]["size"]["artifact_bytes"]["artifact"] > weights


def test_compare_writes_a_table_and_a_png(tiny_model, tmp_path) -> None:
    folder = tiny_model("llama")
    out = tmp_path / "cmp"
    r = CliRunner().invoke(cli, ["compare", "--model", str(folder), "-f", "int8", "-f", "int4-g32", "-f", "int3-g32",
                                 "--evaluator", "kl:ctx=64,max_tokens=600",
                                 "--evaluator", "perplexity:ctx=64,max_tokens=600", "--out", str(out)],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    table = (out / "compare.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| variant | bits/weight")
    assert [line.split("|")[1].strip() for line in lines[1:]] == ["original", "rtn int8", "rtn int4-g32",
                                                                   "rtn int3-g32"]
    data = json.loads((out / "compare.json").read_text())
    rows = {row["variant"]: row for row in data["rows"]}
    assert rows["original"]["kl_mean"] == 0 and rows["rtn int8"]["kl_mean"] < rows["rtn int3-g32"]["kl_mean"]
    assert rows["rtn int8"]["bpw"] > rows["rtn int4-g32"]["bpw"] > rows["rtn int3-g32"]["bpw"]
    png = (out / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    img = matplotlib.image.imread(out / "compare.png")
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400
    assert float(img[..., :3].std()) > 0.05  # not a blank canvas


def test_compare_without_matplotlib_writes_the_table_and_says_how_to_plot(tiny_model, tmp_path, monkeypatch) -> None:
    """matplotlib is the `plot` extra, not a dependency of the core: without it qf compare
    writes its table and JSON and names the install command for the plot."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    out = tmp_path / "cmp"
    r = CliRunner().invoke(cli, ["compare", "--model", str(tiny_model("llama")), "-f", "int8",
                                 "--evaluator", "kl:ctx=64,max_tokens=600", "--out", str(out)],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert (out / "compare.md").is_file() and (out / "compare.json").is_file()
    assert not (out / "compare.png").exists()
    assert "pip install 'quantfoundry[plot]'" in " ".join(r.output.split())


def test_compare_needs_a_quality_evaluator(tmp_path) -> None:
    r = CliRunner().invoke(cli, ["compare", "-f", "int8", "--evaluator", "size", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "needs a quality evaluator" in r.output


def test_a_loader_bug_is_not_taken_for_cannot_load(tiny_model, tmp_path, register_plugin) -> None:
    """Whether an exporter can reload is its ``can_load`` flag: a NotImplementedError raised
    inside a real loader is a bug to report, not a reason to skip the artifact check quietly."""
    register_plugin(_Plugin(), "test-exporters")
    with pytest.raises(NotImplementedError, match="a helper the loader calls is unfinished"):
        qf.run(tiny_model("llama"), format="int4-g32", exporter="buggy-loader", out=tmp_path / "o",
               evaluators=[("kl", SMALL)], progress=False)

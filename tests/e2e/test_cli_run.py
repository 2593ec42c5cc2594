"""`qf run` end to end on the embedded default model, through click's runner."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import quantfoundry as qf
import torch
from click.testing import CliRunner
from quantfoundry import QuantLinear
from quantfoundry.cli import cli
from quantfoundry.data import default_eval_text


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("run") / "artifact"
    result = CliRunner().invoke(cli, ["run", "--out", str(out), "--format", "int4-g128"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out, result.output


def test_run_ends_with_the_metric_table(default_run) -> None:
    out, output = default_run
    assert "metric" in output and "original" in output and "quantized" in output
    row = next(line for line in output.splitlines() if "perplexity.perplexity" in line)
    original, quantized = (float(x) for x in row.replace("│", " ").split()[1:3])
    assert original == pytest.approx(6.640, abs=0.01)  # shared/models/pycode-7m/SOURCE.md
    assert original < quantized < original * 1.2
    assert "size.linear_bpw" in output and "4.1875" in output


def test_manifest_records_the_run(default_run) -> None:
    out, _ = default_run
    m = json.loads((out / "quantfoundry.json").read_text())
    assert m["quantizer"] == [{"name": "rtn", "options": {}, "role": "quantizer"}]
    assert m["format"]["spec"] == "int4-g128"
    assert m["source"]["sha256"] == "5e02a8b9d73bf72ca3af2699379e5423a3a3de3749436a88ad5d73b48f501c4a"
    assert m["plan"]["lm_head"]["format"] is None and "kept in float" in m["plan"]["lm_head"]["reason"]
    assert len(m["tensors"]) == 42
    ppl = m["evaluation"]["metrics"]["perplexity"]["perplexity"]
    assert math.isfinite(ppl["original"]) and math.isfinite(ppl["quantized"])
    # the artifact was reloaded and re-evaluated: bit-identical weights, the same perplexity
    assert ppl["artifact"] == pytest.approx(ppl["quantized"], rel=1e-9)
    assert m["evaluation"]["artifact_check"]["ok"] is True
    assert m["evaluation"]["metrics"]["perplexity"]["text_sha256"]["quantized"] == \
        hashlib.sha256(default_eval_text().read_bytes()).hexdigest()[:16]
    assert m["evaluation"]["evaluators"]["perplexity"]["options"]["protocol"] == "core"
    assert m["versions"]["torch"] == torch.__version__
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "quantfoundry"
    assert (out / "tokenizer.json").is_file()


def test_reload_is_bit_identical(default_run) -> None:
    out, _ = default_run
    fresh = qf.run(format="int4-g128", out=None, keep_model=True, progress=False)
    loaded = qf.load(out)
    mem = {n: m for n, m in fresh.model.named_modules() if isinstance(m, QuantLinear)}
    disk = {n: m for n, m in loaded.named_modules() if isinstance(m, QuantLinear)}
    assert mem.keys() == disk.keys() and len(mem) == 42
    for name in mem:
        a, b = mem[name].qweight, disk[name].qweight
        assert a.format == b.format and a.shape == b.shape
        assert torch.equal(a.packed, b.packed)
        for k in a.params:
            assert a.params[k].dtype == b.params[k].dtype and torch.equal(a.params[k], b.params[k])
    ids = torch.randint(0, 4096, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(fresh.model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    for name, p in fresh.model.named_parameters():
        assert torch.equal(p, dict(loaded.named_parameters())[name]), name


def test_eval_and_load_commands(default_run) -> None:
    out, _ = default_run
    r = CliRunner().invoke(cli, ["eval", str(out), "--evaluator", "size"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "size.linear_bpw" in r.output
    m = json.loads((out / "quantfoundry.json").read_text())
    sizes = m["artifact_evaluation"]["metrics"]["size"]
    assert sizes["linear_bpw"]["artifact"] == pytest.approx(4.1875)
    assert sizes["artifact_bytes"]["artifact"] == sum(p.stat().st_size for p in out.rglob("*")
                                                      if p.is_file() and p.name != "quantfoundry.json")
    r = CliRunner().invoke(cli, ["load", str(out)], catch_exceptions=False)
    assert r.exit_code == 0 and "reloaded 42 quantized linears" in r.output


def test_recipe_and_flags(tmp_path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text('[quantizer]\nname = "rtn"\n[format]\nname = "int"\nbits = 3\ngroup_size = 64\n'
                      '[[evaluator]]\nname = "size"\n')
    out = tmp_path / "o"
    r = CliRunner().invoke(cli, ["run", "--recipe", str(recipe), "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    m = json.loads((out / "quantfoundry.json").read_text())
    assert m["format"]["spec"] == "int3-g64"
    assert "perplexity" not in m["evaluation"]["metrics"]


def test_dry_run_shows_the_plan() -> None:
    r = CliRunner().invoke(cli, ["run", "--dry-run", "--format", "int3-g128"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "model.layers.0.self_attn.q_proj" in r.output and "int3-g128" in r.output


def test_real_model_with_widths_that_do_not_fit(shared, tmp_path) -> None:
    """stories260K (widths 64 and 172): every fallback is in the summary and the manifest."""
    out = tmp_path / "st"
    r = CliRunner().invoke(cli, ["run", "--model", str(shared / "models" / "stories260K"), "--format", "int4-g128",
                                 "--evaluator", "size", "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "30 x int4-g64, 5 x int4" in r.output and "35 fallback(s)" in r.output
    assert "fallback int4-g128 -> int4 (172 columns are not a multiple of the group size 128): 5 tensor(s)" in r.output
    m = json.loads((out / "quantfoundry.json").read_text())
    down = m["plan"]["model.layers.0.mlp.down_proj"]
    assert down == {"shape": [64, 172], "format": "int4", "requested": "int4-g128",
                    "reason": "172 columns are not a multiple of the group size 128: fallback int4"}
    assert any("fallback" in n for n in m["notes"])


def test_size_counts_tied_embeddings_once(shared, tmp_path) -> None:
    """stories260K ties its output head to the embeddings: 260,032 fp32 parameters."""
    out = tmp_path / "st"
    result = qf.run(str(shared / "models" / "stories260K"), format="int8", evaluators=["size"], out=out,
                    progress=False)
    size = result.metrics["size"]["model_bytes"]
    assert size["original"] == 260_032 * 4
    on_disk = (out / "model.safetensors").stat().st_size
    assert on_disk - 16_384 < size["quantized"] <= on_disk  # the file adds only its JSON header
    loaded = qf.load(out)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_threads_set_torch_for_the_run_and_are_restored(tiny_model, monkeypatch, tmp_path) -> None:
    import quantfoundry.pipeline.run as qf_run_module

    seen: list[int] = []
    real = qf_run_module.quantize_and_export

    def spy(state):
        seen.append(torch.get_num_threads())
        return real(state)

    monkeypatch.setattr(qf_run_module, "quantize_and_export", spy)
    before = torch.get_num_threads()
    r = CliRunner().invoke(cli, ["run", "--model", str(tiny_model("llama")), "--format", "int8", "--no-eval",
                                 "--threads", "1", "--out", str(tmp_path / "o")], catch_exceptions=False)
    assert seen == [1] and torch.get_num_threads() == before, r.output
    r = CliRunner().invoke(cli, ["run", "--model", str(tiny_model("llama")), "--threads", "0", "--no-eval"])
    assert r.exit_code != 0 and "threads must be a positive integer" in r.output

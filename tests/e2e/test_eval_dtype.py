"""Evaluation in the deployment dtype (``--eval-dtype``): the quantized model, the reloaded
artifact and the original all run in bfloat16, the original's cached results are kept apart
from float32's, and the manifest says the precision and which kernels ran."""

from __future__ import annotations

import json
import math

import quantfoundry as qf
import torch
from click.testing import CliRunner
from quantfoundry.cli import cli

SMALL = {"ctx": 64, "max_tokens": 600}


def test_a_run_evaluates_in_bfloat16(tiny_model, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("QF_CACHE_DIR", str(tmp_path / "cache"))
    folder = tiny_model("llama")
    evals = [("perplexity", SMALL), ("kl", SMALL)]
    runs = {dt: qf.run(folder, format="int8", out=tmp_path / dt, progress=False, evaluators=evals, eval_dtype=dt,
                       keep_model=True)
            for dt in ("float32", "bfloat16")}
    bf, f32 = runs["bfloat16"], runs["float32"]
    manifest = json.loads((tmp_path / "bfloat16" / "quantfoundry.json").read_text())
    assert manifest["evaluation"]["precision"] == "bfloat16"
    assert manifest["evaluation"]["kernels"] == {"quantized": {"torch-dequant": 14}, "artifact": {"torch-dequant": 14}}
    assert all(p.dtype == torch.bfloat16 for n, p in bf.model.named_parameters() if p.is_floating_point())
    ppl = bf.metrics["perplexity"]["perplexity"]
    # the original ran in bfloat16 too (not read from float32's cache): its perplexity moved
    assert ppl["original"] != f32.metrics["perplexity"]["perplexity"]["original"]
    assert math.isclose(ppl["original"], f32.metrics["perplexity"]["perplexity"]["original"], rel_tol=0.05)
    assert ppl["artifact"] == ppl["quantized"]  # the artifact reloads to the same bfloat16 model
    assert bf.metrics["kl"]["kl_mean"]["quantized"] >= 0
    assert not [n for n in bf.notes if "MISMATCH" in n]


def test_qf_eval_takes_the_dtype(tiny_model, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("QF_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "a"
    qf.run(tiny_model("llama"), format="int8", out=out, progress=False, evaluators=[])
    r = CliRunner().invoke(cli, ["eval", str(out), "--evaluator", "perplexity:ctx=64,max_tokens=600",
                                 "--eval-dtype", "float16"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "quantfoundry.json").read_text())["artifact_evaluation"]["precision"] == "float16"
    bad = CliRunner().invoke(cli, ["eval", str(out), "--eval-dtype", "float8"])
    assert bad.exit_code != 0 and "unknown dtype 'float8'" in bad.output

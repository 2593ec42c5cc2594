"""Runs across processes (``--devices``, ``torchrun``): on the CPU with the gloo backend, two
processes write the very artifact one process writes."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import quantfoundry as qf
from quantfoundry.errors import UsageError

# 10 samples in batches of 2: 5 batches, so the ranks hold 3 and 2 of them
CAL = {"n_samples": 10, "seq_len": 32}


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.suffix in (".safetensors", ".gguf")}


def _run(folder: Path, out: Path, **extra) -> qf.RunResult:
    return qf.run(folder, calibrator_options=CAL, batch_size=2, threads=1, progress=False, evaluators=[],
                  out=out, **extra)


@pytest.mark.parametrize(("arch", "quantizer"), [("llama", "gptq"), ("qwen2_moe", "gptq"), ("mixtral", "awq")])
def test_two_processes_write_the_artifact_one_process_writes(tiny_model, tmp_path, arch, quantizer):
    """The calibration batches sharded over two gloo processes, the statistics (Hessians, Grams,
    mean |x|, the experts' token counts) reduced, GPTQ's column loops split between the ranks:
    byte for byte the one-process artifact — for a dense model, a MoE with a shared expert (with
    ``fill`` routing, whose quotas are per batch of the whole set), and AWQ's folds into a router."""
    folder = tiny_model(arch)
    one = _run(folder, tmp_path / "one", quantizer=quantizer)
    two = _run(folder, tmp_path / "two", quantizer=quantizer, devices="cpu,cpu")
    assert _digest(tmp_path / "one") == _digest(tmp_path / "two") != {}
    assert any("2 processes: 5 calibration batches of 2" in n for n in two.manifest["notes"])
    strip = [n for n in two.manifest["notes"] if "processes" not in n]
    assert strip == one.manifest["notes"]  # the notes of the work on rank 1 reach rank 0, in order


def test_torchrun_processes_write_the_same_artifact(tiny_model, tmp_path):
    """``torchrun --nproc-per-node 2 -m quantfoundry run``: rank 0 writes the artifact and
    prints the report, rank 1 prints nothing; the bytes are the one-process run's."""
    folder = tiny_model("llama")
    _run(folder, tmp_path / "one", quantizer="gptq")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "quantfoundry", "run",
           "--model", str(folder), "--quantizer", "gptq", "--calibrator-opt", "n_samples=10",
           "--calibrator-opt", "seq_len=32", "--batch-size", "2", "--threads", "1", "--no-eval",
           "--out", str(tmp_path / "torchrun")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _digest(tmp_path / "one") == _digest(tmp_path / "torchrun")
    assert r.stdout.count("artifact:") == 1


@pytest.mark.parametrize(("options", "message"), [
    ({"quantizer": [("smoothquant", {}), ("rtn", {})]}, "outside the toolkit's collectors"),
    ({"quantizer": "gptq", "activations": "int8-static", "exporter": "compressed-tensors"},
     "static activation and KV-cache scales are not reduced"),
    ({"quantizer": "gptq", "resume": True}, "does not resume"),
    ({"quantizer": "gptq", "devices": "cpu"}, "--devices takes two or more devices"),
    ({"quantizer": "gptq", "devices": "cpu,cuda:0"}, "all CUDA devices"),
])
def test_what_processes_cannot_do_is_refused_before_any_work(tiny_model, tmp_path, options, message):
    opts = {"devices": "cpu,cpu", **options}
    with pytest.raises(UsageError, match=message):
        qf.run(tiny_model("llama"), out=tmp_path / "out", progress=False, evaluators=[], **opts)
    assert not (tmp_path / "out").exists()


def test_fewer_batches_than_processes_is_refused(tiny_model, tmp_path):
    with pytest.raises(UsageError, match="1 calibration batch\\(es\\) for 2 processes"):
        qf.run(tiny_model("llama"), quantizer="gptq", devices="cpu,cpu", calibrator_options=CAL, batch_size=16,
               out=tmp_path / "out", progress=False, evaluators=[])


def test_an_expert_one_rank_never_sees_keeps_the_ranks_in_step(tiny_model, tmp_path):
    """16 experts, 2 per token, 4-token batches and ``topk`` routing: experts the router sends no
    token of one rank's batches (their gate and up zero on that rank, sharing one input on the
    other) and experts no rank ever sees (rounded to nearest by GPTQ's rule): the ranks still
    reduce the same entries, and the bytes are the one-process run's."""
    folder = tiny_model("mixtral", num_local_experts=16)
    extra = dict(quantizer="gptq", expert_routing="topk", expert_min_tokens=0, evaluators=[], progress=False,
                 calibrator_options={"n_samples": 4, "seq_len": 4}, batch_size=1, threads=1)
    one = qf.run(folder, out=tmp_path / "one", **extra)
    qf.run(folder, out=tmp_path / "two", devices="cpu,cpu", **extra)
    assert _digest(tmp_path / "one") == _digest(tmp_path / "two")
    assert any("saw no calibration token" in n for n in one.manifest["notes"])

"""Crash-resume: a killed run continues from its block journal and writes the same bytes; a
changed input refuses to resume; signals stop at a block boundary; leftovers of dead runs are
cleaned; --overwrite never loses the old artifact before the new one is complete."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import quantfoundry as qf
import torch
from quantfoundry import hookimpl
from quantfoundry.errors import ArtifactError, QFError, UsageError


def digest(folder: Path) -> dict[str, str]:
    """SHA-256 of every artifact file but the manifest (which has a creation time)."""
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file() and f.name != "quantfoundry.json"}


def journals(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.partial-*"))


def qf_cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from quantfoundry.cli import main; main()", *args]


def signal_once_journaled(proc: subprocess.Popen, out: Path, block: int, sig: int) -> None:
    """Send ``sig`` to ``proc`` as soon as block ``block`` is in the journal of the run to ``out``."""
    deadline = time.time() + 300
    marker = f"block-{block:05d}.safetensors"
    while time.time() < deadline and proc.poll() is None:
        if any((j / marker).exists() for j in journals(out)):
            proc.send_signal(sig)
            return
        time.sleep(0.02)


@pytest.mark.slow
def test_gptq_killed_after_block_3_resumes_to_the_same_bytes(tmp_path) -> None:
    """pycode-7m, GPTQ: SIGKILL once three of six blocks are journaled; `--resume` finishes the
    run; the artifact is byte-identical to an uninterrupted run's."""
    args = ["run", "--quantizer", "gptq", "--no-eval", "--no-progress"]
    whole = tmp_path / "whole"
    subprocess.run(qf_cli(*args, "--out", str(whole)), check=True, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(qf_cli(*args, "--out", str(out)), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    signal_once_journaled(proc, out, 2, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not out.exists() and len(journals(out)) == 1
    done = sorted(p.name for p in journals(out)[0].glob("block-*.safetensors"))
    assert 3 <= len(done) < 6, done
    r = subprocess.run(qf_cli(*args, "--out", str(out), "--resume"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"resuming from the journal {journals_name(out, r.stderr)}: {len(done)} finished block(s) restored" \
        in r.stderr
    assert digest(out) == digest(whole)
    manifest = json.loads((out / "quantfoundry.json").read_text())
    assert manifest["resumed"]["from_block"] == len(done)
    assert not journals(out)  # removed once the artifact is in place


def journals_name(out: Path, stderr: str) -> str:
    prefix = f".{out.name}.partial-"
    return next(w.rstrip(":") for w in stderr.split() if w.startswith(prefix))


class SignalDuring(qf.Quantizer):
    """RTN that sends this process a signal while it quantizes one chosen block."""

    name = "signal-during"
    scope = "block"
    at: int = 1
    sig: int = signal.SIGTERM

    def quantize_block(self, block, ctx):
        if block.index == self.at:
            os.kill(os.getpid(), self.sig)
        return {n: f.quantize(block.linear(n).weight.float()) for n, f in block.formats.items()}


class RTNBlock(qf.Quantizer):
    """The same rounding without the signal (the uninterrupted run)."""

    name = "rtn-block"
    scope = "block"

    def quantize_block(self, block, ctx):
        return {n: f.quantize(block.linear(n).weight.float()) for n, f in block.formats.items()}


def interrupted(folder: Path, out: Path) -> None:
    """A run to ``out`` stopped by SIGTERM after block 2 of 4 (its journal keeps blocks 0 and 1)."""
    SignalDuring.sig = signal.SIGTERM
    with pytest.raises(QFError, match="stopped on SIGTERM"):
        qf.run(str(folder), quantizer="signal-during", format="int4-g32", out=out, progress=False)
    SignalDuring.sig = 0  # the next runs: no more signals (signal 0 only checks the process exists)


@pytest.fixture
def stage_plugins(register_plugin):
    class P:
        @hookimpl
        def qf_register_quantizers(self, register):
            register(SignalDuring)
            register(RTNBlock)

    register_plugin(P(), "resume-test-stages")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_at_the_block_boundary_and_resume_writes_the_same_artifact(
        stage_plugins, tiny_model, tmp_path, sig) -> None:
    folder = tiny_model("llama", num_hidden_layers=4)
    SignalDuring.sig = sig
    whole = tmp_path / "whole"
    qf.run(str(folder), quantizer="rtn-block", format="int4-g32", out=whole, progress=False)
    out = tmp_path / "out"
    with pytest.raises(QFError, match=rf"stopped on {signal.Signals(sig).name} after block 2 of 4; the journal "
                                      r".*--resume \(Python: resume=True\)") as info:
        qf.run(str(folder), quantizer="signal-during", format="int4-g32", out=out, progress=False)
    assert getattr(info.value, "exit_code", None) == 130
    assert not out.exists()
    assert sorted(p.name for p in journals(out)[0].glob("block-*")) == ["block-00000.safetensors",
                                                                        "block-00001.safetensors"]
    lines: list[str] = []
    SignalDuring.sig = 0  # resuming: no more signals (signal 0 only checks the process exists)
    result = qf.run(str(folder), quantizer="signal-during", format="int4-g32", out=out, progress=False,
                    resume=True, report=lines.append)
    assert lines and lines[0].startswith("resuming from the journal") and "2 finished block(s)" in lines[0]
    assert result.manifest["resumed"]["from_block"] == 2
    assert digest(out) == digest(whole)


def test_resume_refuses_changed_inputs_and_a_missing_journal(stage_plugins, tiny_model, tmp_path) -> None:
    folder = tiny_model("llama", num_hidden_layers=4)
    out = tmp_path / "out"
    interrupted(folder, out)
    with pytest.raises(UsageError, match=r"cannot resume: the journal \.out\.partial-\w+ was written by a run with "
                                         r"other inputs: format changed \(journal: .*int4-g32.*; now: .*int4-g16"):
        qf.run(str(folder), quantizer="signal-during", format="int4-g16", out=out, progress=False, resume=True)
    with pytest.raises(UsageError, match="cannot resume: no journal of an interrupted run to"):
        qf.run(str(folder), quantizer="signal-during", format="int4-g32", out=tmp_path / "other", progress=False,
               resume=True)
    # a fresh run says a journal exists, before any work, and starts over
    lines: list[str] = []
    qf.run(str(folder), quantizer="signal-during", format="int4-g32", out=out, progress=False, report=lines.append)
    assert lines[0].startswith(f"a resumable journal of an interrupted run to {out} exists (2 finished block(s)")
    assert "pass --resume to continue it instead" in lines[0]
    assert not journals(out)


def test_cli_prints_the_resume_command_on_sigterm(tmp_path) -> None:
    """A SIGTERM sent to `qf run` stops it after the current block: exit code 130, and the
    message names the command that resumes it."""
    out = tmp_path / "o"
    args = ["run", "--quantizer", "gptq", "--no-eval", "--no-progress", "--out", str(out)]
    proc = subprocess.Popen(qf_cli(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    signal_once_journaled(proc, out, 0, signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "stopped on SIGTERM after block" in err
    assert f"--out {out} --resume" in " ".join(err.split())
    r = subprocess.run(qf_cli(*args, "--resume"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (out / "quantfoundry.json").is_file()


def test_leftovers_of_dead_runs_are_cleaned(tmp_path) -> None:
    dead = 2 ** 22 + 12345  # above the usual pid_max: no such process
    out = tmp_path / "o"
    (tmp_path / f".o.tmp-{dead}").mkdir()
    (tmp_path / f".o.tmp-{dead}" / "half.safetensors").write_bytes(b"x")
    (tmp_path / f".o.old-{dead}").mkdir()  # an --overwrite that died after moving the old artifact aside
    (tmp_path / f".o.old-{dead}" / "marker").write_text("old")
    lines: list[str] = []
    qf.run(format="int8", out=out, progress=False, overwrite=True, report=lines.append)
    assert f"put back {out}, which a dead run (pid {dead}) had moved aside to replace it" in lines
    assert f"removed .o.tmp-{dead}, left by a dead run (pid {dead})" in lines
    assert not list(tmp_path.glob(".o.*"))
    assert not (out / "marker").exists()  # the put-back old artifact was then replaced by this run's


def test_overwrite_keeps_the_old_artifact_until_the_new_one_is_verified(register_plugin, tmp_path) -> None:
    from quantfoundry.builtin.qf_exporter import QFExporter

    class FailsVerify(QFExporter):
        name = "qf-fails-verify"

        def verify(self, folder):
            raise ArtifactError("verify failed on purpose")

    class P:
        @hookimpl
        def qf_register_exporters(self, register):
            register(FailsVerify)

    register_plugin(P(), "fails-verify")
    out = tmp_path / "o"
    qf.run(format="int8", out=out, progress=False)
    before = digest(out)
    with pytest.raises(ArtifactError, match="verify failed on purpose"):
        qf.run(format="int4-g128", exporter="qf-fails-verify", out=out, overwrite=True, progress=False)
    assert digest(out) == before  # the old artifact, untouched
    assert not list(tmp_path.glob(".o.tmp-*")) and not list(tmp_path.glob(".o.old-*"))


def test_another_live_run_on_the_same_output_is_refused(stage_plugins, tiny_model, tmp_path) -> None:
    folder = tiny_model("llama", num_hidden_layers=4)
    out = tmp_path / "out"
    interrupted(folder, out)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (journals(out)[0] / "lock").write_text(f"{sleeper.pid}\n")
        with pytest.raises(UsageError, match=f"another run \\(pid {sleeper.pid}\\) is writing"):
            qf.run(str(folder), quantizer="signal-during", format="int4-g32", out=out, progress=False, resume=True)
        # nor is its journal replaced by a run with other inputs
        with pytest.raises(UsageError, match=f"another run \\(pid {sleeper.pid}\\) is writing"):
            qf.run(str(folder), quantizer="signal-during", format="int4-g16", out=out, progress=False)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_the_journal_restores_float_tensors_a_transform_changed(register_plugin, tiny_model, tmp_path) -> None:
    """Blocks restored from the journal carry what a transform did to their float tensors (a
    norm scaled), so the resumed artifact equals the uninterrupted one."""

    class Halve(qf.Transform):
        name = "halve-norm"

        def transform_block(self, block, ctx):
            norm = block.module.input_layernorm
            norm.weight.data = norm.weight.data * 0.5
            for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                block.linear(n).weight.data *= 2

    class P:
        @hookimpl
        def qf_register_quantizers(self, register):
            register(Halve)
            register(SignalDuring)
            register(RTNBlock)

    register_plugin(P(), "halve")
    folder = tiny_model("llama", num_hidden_layers=4)
    whole = tmp_path / "whole"
    qf.run(str(folder), quantizer=[("halve-norm", {}), ("rtn-block", {})], format="int4-g32", out=whole,
           progress=False)
    out = tmp_path / "out"
    SignalDuring.sig = signal.SIGTERM
    with pytest.raises(QFError, match="stopped on SIGTERM"):
        qf.run(str(folder), quantizer=[("halve-norm", {}), ("signal-during", {})], format="int4-g32", out=out,
               progress=False)
    SignalDuring.sig = 0
    qf.run(str(folder), quantizer=[("halve-norm", {}), ("signal-during", {})], format="int4-g32", out=out,
           progress=False, resume=True)
    assert digest(out) == digest(whole)
    from safetensors.torch import load_file

    src = load_file(str(folder / "model.safetensors"))
    got = load_file(str(out / "model.safetensors"))
    norm = "model.layers.0.input_layernorm.weight"
    torch.testing.assert_close(got[norm].float(), (src[norm].float() * 0.5).to(torch.bfloat16).float())

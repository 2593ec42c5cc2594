"""Issue 16.7: Ctrl-C and long silences say what happened and what to do next."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import quantfoundry as qf
from click.testing import CliRunner
from quantfoundry import cli as cli_module
from quantfoundry.cli import cli
from quantfoundry.hookspecs import hookimpl


def test_ctrl_c_while_starting_is_one_line(monkeypatch, capsys) -> None:
    def interrupted() -> None:
        raise KeyboardInterrupt
    monkeypatch.setattr(cli_module, "cli", interrupted)
    with pytest.raises(SystemExit) as exit_:
        cli_module.main()
    assert exit_.value.code == 130
    assert capsys.readouterr().err == "Error: interrupted (Ctrl-C)\n"


def test_ctrl_c_during_start_up_of_the_real_command(tmp_path) -> None:
    """The user's step: Ctrl-C while ``qf run`` still loads torch and the plugins."""
    qf_exe = [sys.executable, "-c", "from quantfoundry.cli import main; main()"]
    proc = subprocess.Popen([*qf_exe, "run", "--out", str(tmp_path / "o")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    time.sleep(0.5)  # importing torch and the plugins takes seconds on 2 cores
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert "Traceback" not in err, err
    assert proc.returncode == 130 and err.strip().splitlines()[-1].startswith("Error: interrupted"), err
    assert not (tmp_path / "o").exists()


class _Interrupting(qf.Evaluator):
    name = "interrupting"
    description = "presses Ctrl-C while the artifact is evaluated"

    def evaluate(self, target):  # noqa: ANN001, ANN201
        if target.label == "artifact":
            raise KeyboardInterrupt
        return {}


class _Plugin:
    @hookimpl
    def qf_register_evaluators(self, register) -> None:  # noqa: ANN001
        register(_Interrupting)


def test_ctrl_c_during_evaluation_says_the_artifact_is_usable(register_plugin, tiny_model, tmp_path) -> None:
    register_plugin(_Plugin(), "interrupting-test")
    out = tmp_path / "o"
    r = CliRunner().invoke(cli, ["run", "--no-progress", "--model", str(tiny_model("llama")), "--out", str(out),
                                 "--evaluator", "interrupting"])
    assert r.exit_code == 130, r.output
    assert r.output.strip() == (f"Error: interrupted during evaluation; the artifact {out} is complete and usable "
                                f"(only this report is missing): evaluate it with qf eval {out}")
    assert qf.load(out) is not None


def test_qf_eval_does_not_claim_to_quantize(tiny_model, tmp_path) -> None:
    out = tmp_path / "o"
    model = tiny_model("llama")
    assert CliRunner().invoke(cli, ["run", "--no-progress", "--model", str(model), "--out", str(out),
                                    "--no-eval"]).exit_code == 0
    r = CliRunner().invoke(cli, ["eval", str(out), "--evaluator", "size", "--original", str(model)])
    assert r.exit_code == 0, r.output
    assert not r.output.startswith("quantized")  # it quantized nothing
    assert r.output.startswith(f"evaluated {out}: it stores ")


def test_compare_prints_plain_progress_without_a_terminal(tiny_model, tmp_path) -> None:
    r = CliRunner().invoke(cli, ["compare", "--model", str(tiny_model("llama")), "-f", "int8", "-f", "int4-g32",
                                 "--evaluator", "kl", "--out", str(tmp_path / "cmp")])
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("[")]
    assert [ln.split(" (")[0] for ln in lines] == ["[1/2] rtn int8", "[2/2] rtn int4-g32"], r.stderr

"""Issue 16.2: docs/deploy.md's commands run as written, and ``qf run`` ends with the one command
that runs its artifact (the GPTQ/AWQ loaders' commands run in tests/engines/)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import quantfoundry as qf
from click.testing import CliRunner
from quantfoundry.cli import cli

DEPLOY = Path(__file__).resolve().parents[2] / "docs" / "deploy.md"


def deploy_commands(section: str) -> list[str]:
    """The ``python -c`` lines of one ``## `exporter` `` section of docs/deploy.md."""
    text = DEPLOY.read_text()
    body = text.split(f"## `{section}`", 1)[1].split("\n## ", 1)[0]
    return [ln.strip() for ln in body.splitlines() if ln.strip().startswith("python -c ")]


def run_python(command: str, out: Path, env: dict[str, str] | None = None) -> str:
    argv = shlex.split(command.replace("OUT", str(out)))
    r = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, env={**os.environ, **(env or {})})
    assert r.returncode == 0, f"{command}\n{r.stderr[-3000:]}"
    return r.stdout


def test_qf_run_prints_the_command_and_it_runs(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli, ["run", "--no-progress", "--no-eval", "--out", "o"])
    assert r.exit_code == 0, r.output
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("run it: python -c "), last
    argv = shlex.split(last.removeprefix("run it: "))
    out = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("<s> Once upon a time") and len(out.stdout) > 40, out.stdout
    assert deploy_commands("qf") == [last.removeprefix("run it: ").replace('"o"', '"OUT"')]


def test_gguf_commands_of_the_deploy_page(llama_cpp_python, llama_cpp, tmp_path) -> None:
    out = tmp_path / "o"
    result = qf.run(format="Q8_0", exporter="gguf", evaluators=[], out=out, progress=False)
    assert result.run_command == (f"llama-completion -m {out / 'model.gguf'} -no-cnv -p 'Once upon a time' -n 32")
    commands = deploy_commands("gguf")
    assert len(commands) == 2  # llama-cpp-python, transformers' GGUF reader
    lib = {"LLAMA_CPP_LIB_PATH": os.environ.get("LLAMA_CPP_LIB_PATH", str(llama_cpp["bin"]))}
    for command in commands:
        text = run_python(command, out, lib)
        assert len(text.strip()) > 10, (command, text)


@pytest.mark.parametrize("section", ["hf-gptq", "hf-awq"])
def test_hf_sections_print_what_the_exporters_print(section, tmp_path) -> None:
    exporter = qf.get_plugin_manager().registry("exporter").get(section)
    printed = exporter(exporter.Options()).run_command(Path("OUT")).split("  # needs:")[0]
    assert printed in deploy_commands(section)
    needs = re.search(r"# needs: pip install (.*)$", exporter(exporter.Options()).run_command(Path("OUT")))
    assert needs is not None
    section_text = DEPLOY.read_text().split(f"## `{section}`", 1)[1].split("\n## ", 1)[0]
    for package in needs.group(1).split():
        assert package in section_text

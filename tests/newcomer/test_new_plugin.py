"""Issue 16.10: ``qf new-plugin NAME --role ROLE`` writes a package that installs as written and
whose own tests — the conformance kit's checks for the role among them — pass out of the box."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner
from quantfoundry.cli import cli
from quantfoundry.scaffold import ROLES


@pytest.mark.parametrize("role", ROLES)
def test_scaffolded_plugin_installs_and_passes_its_tests(role, tmp_path) -> None:
    name = f"qf-try-{role}"
    r = CliRunner().invoke(cli, ["new-plugin", name, "--role", role, "--dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    folder = tmp_path / name
    site = tmp_path / "site"  # installed beside, not into, this environment: its entry point stays out of it
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--target", str(site), str(folder)], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=folder, env=env,
                           capture_output=True, text=True)
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-2000:]
    assert " passed" in tests.stdout and " failed" not in tests.stdout
    listed = subprocess.run([sys.executable, "-m", "quantfoundry", "plugins"], env=env, capture_output=True,
                            text=True)
    assert name in listed.stdout, listed.stdout + listed.stderr


def test_bad_names_and_existing_folders_are_refused(tmp_path) -> None:
    r = CliRunner().invoke(cli, ["new-plugin", "My_Plugin", "--role", "quantizer", "--dir", str(tmp_path)])
    assert r.exit_code == 2 and "lowercase letters, digits and dashes" in r.output
    (tmp_path / "qf-x").mkdir()
    r = CliRunner().invoke(cli, ["new-plugin", "qf-x", "--role", "quantizer", "--dir", str(tmp_path)])
    assert r.exit_code == 2 and "already exists" in r.output

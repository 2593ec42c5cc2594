"""The docs stay true to the code: CLI reference vs click, hooks vs hookspecs."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import click
from quantfoundry import hookspecs
from quantfoundry.cli import cli

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _sections(text: str) -> dict[str, str]:
    parts = re.split(r"(?m)^## ", text)
    return {p.splitlines()[0].strip(): p for p in parts[1:]}


def test_cli_reference_matches_click() -> None:
    sections = _sections((DOCS / "cli.md").read_text())
    assert "qf" in sections
    group_opts = {o for p in cli.params for o in p.opts if o.startswith("-")}
    for opt in group_opts:
        assert f"`{opt}" in sections["qf"], f"qf option {opt} is not documented"
    assert isinstance(cli, click.Group)
    for name, cmd in cli.commands.items():
        title = f"qf {name}"
        assert title in sections, f"command {title} has no section in docs/cli.md"
        body = sections[title]
        real = {o for p in cmd.params for o in p.opts if o.startswith("--") and o != "--help"}
        for opt in real:
            assert f"`{opt}" in body, f"{title} {opt} is not documented"
        documented = set(re.findall(r"`(--[a-z][a-z-]*)", body))
        assert documented <= real, f"{title} documents options that do not exist: {documented - real}"
    assert set(sections) - {"qf"} == {f"qf {n}" for n in cli.commands}


def test_every_hook_is_documented_with_its_signature() -> None:
    text = (DOCS / "plugin-hooks.md").read_text()
    hooks = [n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("qf_")]
    assert len(hooks) == 8
    for name in hooks:
        args = ", ".join(inspect.signature(getattr(hookspecs, name)).parameters)
        assert f"## {name}({args})" in text, f"{name}({args}) is missing from docs/plugin-hooks.md"
        assert len((getattr(hookspecs, name).__doc__ or "").splitlines()) >= 8, f"{name} needs a full docstring"


def test_builtin_load_order_is_documented() -> None:
    from quantfoundry.plugins import DEFAULT_PLUGINS

    text = (DOCS / "plugin-hooks.md").read_text()
    order = ", ".join(f"`{name}`" for name, _ in DEFAULT_PLUGINS)
    assert order in " ".join(text.split())


def test_plugin_hooks_page_is_generated_from_the_hookspecs() -> None:
    """docs/plugin-hooks.md is what docs/hooks.py renders from the hook docstrings, word for word
    (after changing a docstring: python docs/hooks.py)."""
    import runpy

    generate = runpy.run_path(str(DOCS / "hooks.py"))["generate"]
    assert (DOCS / "plugin-hooks.md").read_text() == generate(), "run: python docs/hooks.py"


def test_lifecycle_page_names_every_method_and_field() -> None:
    """docs/lifecycle.md names every public method of every role's base class and every field
    of the objects a plugin receives, so it cannot fall behind the code silently."""
    import dataclasses

    import quantfoundry as qf

    text = (DOCS / "lifecycle.md").read_text()
    roles = [qf.Format, qf.Quantizer, qf.Transform, qf.Exporter, qf.Kernel, qf.Calibrator, qf.Evaluator, qf.Engine,
             qf.Architecture, qf.Planner]
    missing = []
    for cls in roles:
        for name, member in vars(cls).items():
            if name.startswith("_") or name in ("Options", "name", "description"):
                continue
            if callable(member) or isinstance(member, (property, classmethod, staticmethod)):
                if f"{name}(" not in text and f"`{name}`" not in text:
                    missing.append(f"{cls.__name__}.{name}")
    for cls in (qf.QuantContext, qf.Block, qf.BlockInputs, qf.QuantizedWeight, qf.TensorPlan, qf.EvalTarget,
                qf.CalibrationSet, qf.PlanRequest, qf.Budget):
        for f in dataclasses.fields(cls):
            if f"`{f.name}`" not in text:
                missing.append(f"{cls.__name__}.{f.name}")
        for name, member in vars(cls).items():
            if not name.startswith("_") and (callable(member) or isinstance(member, property)) and \
                    f"{name}(" not in text and f"`{name}`" not in text:
                missing.append(f"{cls.__name__}.{name}")
    assert not missing, "docs/lifecycle.md does not mention: " + ", ".join(missing)


def test_tutorial_code_is_the_tested_example() -> None:
    """Every python/toml block of the two tutorials is a tested file of examples/qf-example-plugin
    (``<!-- include: -->``, whole) or a run of its lines (``<!-- excerpt: -->``); none elides code
    (after changing the example: python docs/includes.py)."""
    import runpy

    tool = runpy.run_path(str(DOCS / "includes.py"))
    found = [p for name in tool["PAGES"] for p in tool["problems"](DOCS / name)]
    assert not found, "\n".join(found)


def test_the_tutorial_pyproject_installs(tmp_path) -> None:
    """The tutorial's pyproject.toml, as shown, builds a wheel that carries the entry point."""
    import shutil
    import subprocess
    import sys
    import zipfile

    example = DOCS.parent / "examples" / "qf-example-plugin"
    shutil.copytree(example, tmp_path / "p", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                        str(tmp_path / "w"), str(tmp_path / "p")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = (tmp_path / "w").glob("qf_example_plugin-0.1.0-*.whl")
    with zipfile.ZipFile(wheel) as z:
        eps = next(n for n in z.namelist() if n.endswith("entry_points.txt"))
        assert "mse-rtn = qf_example_plugin" in z.read(eps).decode()

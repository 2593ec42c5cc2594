"""The layering rules of the code base, checked on its source (AST, every import — top-level,
TYPE_CHECKING and inside functions):

* a plugin imports only the core's public API (``quantfoundry``, ``quantfoundry.toolkit``,
  ``quantfoundry.errors``, ``quantfoundry.testing``) and its own package — never core internals
  or another plugin's modules;
* the core's modules import each other without cycles, and ``roles/`` (the base types every
  plugin subclasses) depends on nothing of the pipeline, the built-ins, the toolkit or the CLI;
* library code checks its inputs with exceptions, never with ``assert`` (``python -O`` drops it).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "core" / "quantfoundry"
PUBLIC = ("quantfoundry", "quantfoundry.toolkit", "quantfoundry.errors", "quantfoundry.testing")
PLUGIN_SOURCES = sorted(p for pattern in ("plugins/*/src", "third_party_plugins/*/src", "examples/*/src")
                        for p in ROOT.glob(pattern))


def imports(path: Path, package: str | None = None, modules: set[str] | frozenset[str] = frozenset()
            ) -> list[tuple[int, str]]:
    """``(line, absolute module)`` of every import in ``path`` (relative ones resolved against
    ``package``, the dotted name of the file's package). ``from pkg import a, b`` where every name
    is a module of ``modules`` imports those modules, not ``pkg`` itself."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if package is None:
                    raise ValueError(f"{path}: relative import without a package")
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            names = [f"{mod}.{a.name}" for a in node.names]
            if not all(n in modules for n in names):
                out.append((node.lineno, mod))
            out.extend((node.lineno, n) for n in names)
    return out


def _is_public(module: str) -> bool:
    return any(module == p or (p != "quantfoundry" and module.startswith(p + ".")) for p in PUBLIC)


def _core_module_names() -> dict[str, Path]:
    mods = {}
    for f in CORE.rglob("*.py"):
        rel = f.relative_to(CORE.parent).with_suffix("")
        name = ".".join(rel.parts)
        mods[name.removesuffix(".__init__")] = f
    return mods


def test_there_are_plugins_to_check() -> None:
    assert {p.parent.name for p in PLUGIN_SOURCES} >= {"qf-gguf", "qf-gptq", "qf-awq", "qf-calibration",
                                                       "qf-nf4", "qf-hqq", "qf-example-plugin"}


@pytest.mark.parametrize("src", PLUGIN_SOURCES, ids=lambda p: p.parent.name)
def test_plugins_import_only_the_public_api_and_themselves(src: Path) -> None:
    own = {p.name for p in src.iterdir() if p.is_dir()}
    core = _core_module_names()
    bad = []
    for f in src.rglob("*.py"):
        package = ".".join(f.relative_to(src).parent.parts)
        for line, mod in imports(f, package):
            top = mod.split(".")[0]
            if top == "quantfoundry":
                # `from quantfoundry import hookimpl` yields "quantfoundry.hookimpl": a name, not a module
                if mod in core and not _is_public(mod):
                    bad.append(f"{f.relative_to(ROOT)}:{line}: {mod}")
            elif top.startswith("qf_") and top not in own:
                bad.append(f"{f.relative_to(ROOT)}:{line}: {mod} (another plugin)")
    assert not bad, "plugins must use quantfoundry's public API (quantfoundry, .toolkit, .errors, .testing):\n" + \
        "\n".join(bad)


def _core_graph() -> dict[str, set[str]]:
    mods = _core_module_names()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, f in mods.items():
        package = name if f.name == "__init__.py" else name.rpartition(".")[0]
        for _line, target in imports(f, package, set(mods)):
            while target and target not in mods and "." in target:
                target = target.rpartition(".")[0]
            # "quantfoundry" itself: every submodule's import runs its __init__ first anyway
            if target in mods and target not in (name, "quantfoundry"):
                graph[name].add(target)
    return graph


def test_core_modules_import_each_other_without_cycles() -> None:
    graph = _core_graph()
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, path: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle.extend(path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt])
                return True
            if state.get(nxt) is None and visit(nxt, [*path, node]):
                return True
        state[node] = 2
        return False

    for node in sorted(graph):
        if state.get(node) is None and visit(node, []):
            break
    assert not cycle, "import cycle: " + " -> ".join(dict.fromkeys(cycle)) + f" -> {cycle[-1]}"


def test_roles_depend_on_nothing_of_the_pipeline() -> None:
    graph = _core_graph()
    forbidden = ("quantfoundry.pipeline", "quantfoundry.builtin", "quantfoundry.toolkit", "quantfoundry.evaluation",
                 "quantfoundry.cli", "quantfoundry.testing", "quantfoundry.plugins")
    bad = [f"{m} imports {t}" for m in graph if m.startswith("quantfoundry.roles")
           for t in graph[m] if t.startswith(forbidden)]
    assert not bad, "\n".join(bad)


LIBRARY = [CORE, *PLUGIN_SOURCES]


def test_library_code_uses_no_assert_for_checks() -> None:
    """(quantfoundry.testing is test code: its asserts are the checks.)"""
    found = []
    for root in LIBRARY:
        for f in root.rglob("*.py"):
            if f.is_relative_to(CORE / "testing"):
                continue
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.Assert):
                    found.append(f"{f.relative_to(ROOT)}:{node.lineno}")
    assert not found, "raise an exception with a message instead of assert:\n" + "\n".join(found)

"""Test tooling for QuantFoundry plugin authors (opt-in: ``pytest_plugins = ["quantfoundry.testing"]``).

Fixtures:

* ``qf_plugin_manager`` — a fresh, loaded plugin manager for the test (the process-wide one is
  restored afterwards);
* ``register_plugin`` — ``register_plugin(obj, name)`` registers a plugin object for the
  duration of the test and always unregisters it;
* ``tiny_model`` — ``tiny_model(arch="llama", **config)`` writes a tiny config-built model
  folder (with the embedded tokenizer) and returns its path.

Helpers: :func:`first_block` (a tiny model's first decoder block with calibration inputs, every
linear planned onto one format) and :func:`inputs_of` (a linear's inputs as the block runs).

The conformance kit (:mod:`quantfoundry.testing.conformance`) is a set of base test classes to
subclass; with this plugin active, its tests that take ``arch`` run once per architecture the
class names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .. import plugins as _plugins
from .tiny import LINEARS, TINY_CONFIGS, build_tiny_model, first_block, inputs_of, tiny_config

__all__ = ["LINEARS", "TINY_CONFIGS", "assert_artifact_checked", "assert_passes_in_triton_interpreter",
           "build_tiny_model", "first_block", "inputs_of", "tiny_config"]


def assert_artifact_checked(result: Any, *, engine_may_be_missing: bool = False) -> None:
    """The run opened its written artifact again and found every metric equal to the in-memory
    model's (``artifact_check.ok``). With ``engine_may_be_missing`` (an artifact only an engine
    serves, on a machine without it) a run that could not check says so in a note naming the
    missing engine — never a silent pass."""
    check = result.manifest["evaluation"].get("artifact_check")
    if check is not None:
        assert check["ok"], check
        return
    notes = [n for n in result.notes if n.startswith("artifact not evaluated")]
    assert engine_may_be_missing, f"the run did not check its artifact: {notes}"
    assert notes and "not installed" in notes[0], notes


def assert_passes_in_triton_interpreter(path: Path, timeout: float = 1200) -> None:
    """Run the test file ``path`` (a Triton kernel's kit on CPU tensors) in a subprocess under
    Triton's interpreter (``TRITON_INTERPRET=1``, read when Triton is imported) and assert it
    passed. Skips where a CUDA device runs the compiled kernels instead."""
    import os
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device runs the compiled kernels instead")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(path)],
                          env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0 and " passed" in done.stdout, done.stdout[-4000:] + done.stderr[-2000:]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    from .conformance import parametrize_architectures

    parametrize_architectures(metafunc)


@pytest.fixture
def qf_plugin_manager() -> Iterator[_plugins.QFPluginManager]:
    saved = _plugins._manager
    _plugins.reset_plugin_manager()
    try:
        yield _plugins.get_plugin_manager()
    finally:
        _plugins._manager = saved


@pytest.fixture
def register_plugin(qf_plugin_manager: _plugins.QFPluginManager) -> Iterator[Callable[[Any, str], Any]]:
    names: list[str] = []

    def register(obj: Any, name: str) -> Any:
        qf_plugin_manager.register(obj, name=name)
        names.append(name)
        return obj

    try:
        yield register
    finally:
        for name in names:
            if qf_plugin_manager.get_plugin(name) is not None:
                qf_plugin_manager.unregister(name=name)


@pytest.fixture
def tiny_model(tmp_path: Path) -> Callable[..., Path]:
    def make(arch: str = "llama", **overrides: Any) -> Path:
        return build_tiny_model(tmp_path / f"tiny-{arch}", arch, **overrides)

    return make

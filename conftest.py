"""Fixtures for every test folder of the repository (core, example plugin, plugins/)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

pytest_plugins = ["quantfoundry.testing"]

ROOT = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("QF_SHARED", ROOT.parent / "shared"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"the shared/ folder is missing at {SHARED}; set QF_SHARED")
    return SHARED


@pytest.fixture(scope="session", autouse=True)
def _isolated_reference_cache(tmp_path_factory) -> None:
    """Every test session gets its own reference cache (never the user's ~/.cache)."""
    os.environ["QF_CACHE_DIR"] = str(tmp_path_factory.mktemp("qf-cache"))
    os.environ.pop("QF_NO_CACHE", None)


@pytest.fixture(scope="session")
def llama_cpp(shared) -> dict[str, Path]:  # the built tools: llama-quantize, llama-perplexity, libggml
    """llama.cpp's tools and source tree, built by shared/tools/build-llama-cpp.sh (a no-op when
    they exist; about 5 minutes on 2 cores the first time). Keys: ``bin``, ``src``."""
    r = subprocess.run(["bash", str(shared / "tools" / "build-llama-cpp.sh")], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"building llama.cpp failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    out = dict(line.split("=", 1) for line in r.stdout.splitlines() if line.startswith("LLAMA_CPP_"))
    return {"bin": Path(out["LLAMA_CPP_BIN"]), "src": Path(out["LLAMA_CPP_SRC"])}


@pytest.fixture(scope="session")
def llama_cpp_python(llama_cpp):
    """The ``llama_cpp`` module (llama-cpp-python, the GGUF engine). CI installs the package
    without compiling it (``CMAKE_ARGS=-DLLAMA_BUILD=OFF``): it then has no libllama of its own
    and loads the one built by build-llama-cpp.sh, through ``LLAMA_CPP_LIB_PATH``."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        pytest.fail("llama-cpp-python is not installed: see .ci/run (CMAKE_ARGS=-DLLAMA_BUILD=OFF pip install "
                    "llama-cpp-python==0.3.36)")
    if not (Path(spec.origin).parent / "lib" / "libllama.so").exists():
        os.environ.setdefault("LLAMA_CPP_LIB_PATH", str(llama_cpp["bin"]))
    import llama_cpp as module

    return module


@pytest.fixture(scope="session")
def smollm2(shared) -> Path:
    """SmolLM2-135M-Instruct (Q4_1-dequantized), built by its shared build.sh (a no-op when built)."""
    script = shared / "models" / "smollm2-135m-instruct-q4_1-dequant" / "build.sh"
    r = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"building SmolLM2 failed:\n{r.stderr[-2000:]}")
    return Path(r.stdout.strip().splitlines()[-1])

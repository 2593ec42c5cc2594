"""Fixtures of the qf-gguf tests (the repository's conftest.py builds llama.cpp)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.fixture(scope="session")
def converted(llama_cpp, tmp_path_factory):
    """llama.cpp's own F32 conversion of a model folder, memoized per folder."""
    cache: dict[str, object] = {}

    def get(folder):
        key = str(folder)
        if key not in cache:
            out = tmp_path_factory.mktemp("conv") / "f32.gguf"
            r = subprocess.run([sys.executable, str(llama_cpp["src"] / "convert_hf_to_gguf.py"), key,
                                "--outtype", "f32", "--outfile", str(out)], capture_output=True, text=True)
            assert r.returncode == 0, r.stderr[-2000:]
            cache[key] = out
        return cache[key]
    return get



"""Which encoder writes a GGML type's bytes: compiled (:mod:`qf_gguf.native`, numba) on CPU,
vectorised torch elsewhere.

Both are byte-identical to llama.cpp's ``ggml_quantize_chunk``. On CPU the compiled encoders
run llama.cpp's per-block searches as llama.cpp does, block after block in machine code on every
thread torch is given (``qf run --threads``); the torch path vectorises the same searches over
all blocks of a tensor and suits the GPU, where it stays. Without numba the torch path runs on
CPU too, several times slower, and says so once. ``QF_GGUF_NATIVE=0`` forces the torch path
(benchmarks, tests).
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch

from . import native

_warned = False


def native_enabled() -> bool:
    """True when the compiled encoders run (numba importable and not switched off)."""
    global _warned
    if os.environ.get("QF_GGUF_NATIVE", "1") == "0":
        return False
    if native.available():
        return True
    if not _warned:
        _warned = True
        warnings.warn("qf-gguf: numba is not importable, so GGML types are encoded by the vectorised torch "
                      "path on CPU (several times slower than llama-quantize); pip install numba for the "
                      "compiled encoders", RuntimeWarning, stacklevel=3)
    return False


def native_bytes(ggml_name: str, w: torch.Tensor, importance: torch.Tensor | None, *,
                 search: bool = False) -> torch.Tensor | None:
    """``uint8 [rows, row_bytes]`` from the compiled encoder, or None where it does not apply
    (a CUDA tensor, a type it lacks, numba missing or switched off). ``importance``: None,
    ``[cols]`` or ``[rows, cols]``; ``search``: the search kernel (:func:`native.encode`)."""
    if w.device.type != "cpu" or ggml_name not in native.TYPES or not native_enabled():
        return None
    x = np.ascontiguousarray(w.detach().to(torch.float32).numpy())
    imp = None
    if importance is not None:
        imp = np.ascontiguousarray(importance.detach().to("cpu", torch.float32).numpy())
    native.set_threads(torch.get_num_threads())
    return torch.from_numpy(native.encode(ggml_name, x, imp, search=search))


def native_values(ggml_name: str, raw: torch.Tensor) -> torch.Tensor | None:
    """The values of encoded rows from the compiled decoder, or None where it has none."""
    if ggml_name not in native.DECODES or not native_enabled():
        return None
    native.set_threads(torch.get_num_threads())
    return torch.from_numpy(native.decode(ggml_name, raw.numpy()))

"""Numba ports of llama.cpp's GGML quantization encoders (``ggml-quants.c``), byte-identical to
``ggml_quantize_chunk``.

:func:`encode` turns a float32 matrix into GGML blocks for Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K,
Q3_K, Q4_K, Q5_K and Q6_K, without an importance vector (llama.cpp's ``quantize_row_*_ref``
encoders) or with one (the ``quantize_row_*_impl`` encoders; Q8_0 ignores it, as llama.cpp does).
Rows are encoded in parallel (``numba.prange``; see :func:`set_threads`); the kernels are
compiled on first use and cached on disk (numba's ``cache=True``).

:func:`decode` reads Q2_K … Q6_K rows back to float32 values (llama.cpp's
``dequantize_row_*``).

numba is optional at import time: :func:`available` says whether it can be used.
"""

from __future__ import annotations

import threading

import numpy as np

__all__ = ["DECODES", "TYPES", "available", "decode", "encode", "row_bytes", "set_threads"]

# ggml name -> (elements per block, bytes per block)
_BLOCKS: dict[str, tuple[int, int]] = {
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q8_0": (32, 34),
    "Q2_K": (256, 84),
    "Q3_K": (256, 110),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
}

TYPES: frozenset[str] = frozenset(_BLOCKS)
#: the types :func:`decode` has a compiled decoder for
DECODES: frozenset[str] = frozenset({"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"})

_available: bool | None = None
# One encode at a time: each call already runs on every thread it is given, and numba's fallback
# "workqueue" threading layer (where neither OpenMP nor TBB is found) must not be entered by two
# threads at once.
_lock = threading.Lock()


def available() -> bool:
    """Whether numba can be imported (never raises)."""
    global _available
    if _available is None:
        try:
            import numba  # noqa: F401

            _available = True
        except Exception:
            _available = False
    return _available


def set_threads(n: int) -> None:
    """The number of threads :func:`encode` uses (clamped to ``1..NUMBA_NUM_THREADS``). As
    ``numba.set_num_threads``, this applies to the calling thread."""
    import numba

    numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))


def row_bytes(ggml_name: str, cols: int) -> int:
    """Bytes of one encoded row of ``cols`` values."""
    block, nbytes = _block(ggml_name)
    if cols % block:
        raise ValueError(f"{ggml_name}: {cols} columns are not whole blocks of {block}")
    return cols // block * nbytes


def _block(ggml_name: str) -> tuple[int, int]:
    if ggml_name not in _BLOCKS:
        raise ValueError(f"unknown GGML type {ggml_name!r}; expected one of {', '.join(sorted(TYPES))}")
    return _BLOCKS[ggml_name]


def _kernel(ggml_name: str, search: bool = False):
    from . import _kernels as k

    kernel = {
        "Q4_0": k.rows_q4_0,
        "Q4_1": k.rows_q4_1,
        "Q5_0": k.rows_q5_0,
        "Q5_1": k.rows_q5_1,
        "Q8_0": k.rows_q8_0,
        "Q2_K": k.rows_q2_k,
        "Q3_K": k.rows_q3_k,
        "Q4_K": k.rows_q4_k,
        "Q5_K": k.rows_q5_k,
        "Q6_K": k.rows_q6_k,
    }[ggml_name]
    return k.SEARCH[kernel.__name__] if search else kernel


def encode(ggml_name: str, x: np.ndarray, importance: np.ndarray | None = None, *, search: bool = False) -> np.ndarray:
    """GGML blocks of ``x`` (float32 ``[rows, cols]``): ``uint8 [rows, row_bytes]``, exactly the
    bytes ``ggml_quantize_chunk(type, x, dst, 0, rows, cols, importance)`` writes.

    ``importance`` is None (llama.cpp's ``_ref`` encoders), float32 ``[cols]`` (an imatrix row,
    the same for every row, as llama.cpp uses it) or float32 ``[rows, cols]`` (row ``r`` is
    encoded as llama.cpp encodes that single row with ``importance[r]`` as its quant_weights).
    Non-contiguous arrays are copied; other dtypes, shapes and column counts that are not whole
    blocks raise ``ValueError``. The first call of a type compiles its kernel (seconds), later
    processes load it from numba's on-disk cache.

    ``search=True`` runs the type's search kernel instead (``_kernels.SEARCH``: the scale
    search of Q2_K, Q4_K, Q5_K, Q4_1 and Q5_1 sums in SIMD lanes, about twice as fast, the
    other types unchanged): bytes for *ranking* candidates, where a sub-block within a
    rounding error of a tie may get other codes than llama.cpp writes — never for a file.
    """
    _block(ggml_name)  # an unknown type is the first error
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2:
        raise ValueError(f"{ggml_name}: x must be a float32 numpy array [rows, cols], got "
                         f"{type(x).__name__} {getattr(x, 'dtype', '')} {getattr(x, 'shape', '')}")
    rows, cols = x.shape
    nbytes = row_bytes(ggml_name, cols)
    if importance is None:
        qw = np.empty((0, cols), np.float32)
    else:
        if not isinstance(importance, np.ndarray) or importance.dtype != np.float32:
            raise ValueError(f"{ggml_name}: importance must be a float32 numpy array, got "
                             f"{type(importance).__name__} {getattr(importance, 'dtype', '')}")
        if importance.shape == (cols,):
            qw = importance.reshape(1, cols)
        elif importance.shape == (rows, cols):
            qw = importance
        else:
            raise ValueError(f"{ggml_name}: importance must be [cols] = [{cols}] or [rows, cols] = "
                             f"[{rows}, {cols}], got {list(importance.shape)}")
    if not available():
        raise RuntimeError("qf_gguf.native needs numba (pip install 'numba>=0.60')")
    out = np.zeros((rows, nbytes), np.uint8)
    if rows == 0 or cols == 0:
        return out
    kernel = _kernel(ggml_name, search)
    with _lock:
        kernel(np.ascontiguousarray(x), np.ascontiguousarray(qw), out)
    return out


def decode(ggml_name: str, raw: np.ndarray) -> np.ndarray:
    """The float32 values ``[rows, cols]`` of encoded rows ``raw`` (``uint8 [rows, row_bytes]``),
    as llama.cpp's ``dequantize_row_*`` computes them, for the types in :data:`DECODES`."""
    if ggml_name not in DECODES:
        raise ValueError(f"no compiled decoder for {ggml_name!r}; expected one of {', '.join(sorted(DECODES))}")
    block, nbytes = _block(ggml_name)
    if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8 or raw.ndim != 2 or raw.shape[1] % nbytes:
        raise ValueError(f"{ggml_name}: raw must be uint8 [rows, k * {nbytes}], got "
                         f"{getattr(raw, 'dtype', type(raw).__name__)} {getattr(raw, 'shape', '')}")
    if not available():
        raise RuntimeError("qf_gguf.native needs numba (pip install 'numba>=0.60')")
    from . import _kernels as k

    out = np.empty((raw.shape[0], raw.shape[1] // nbytes * block), np.float32)
    if out.size:
        with _lock:
            k.values_k(np.ascontiguousarray(raw), out, int(ggml_name[1]))
    return out

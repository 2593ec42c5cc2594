"""Issue 22: the machine code of the ``triton-e8p`` GEMV, counted without a GPU.

Compiles the E8P GEMV (``qf_quip.gemv._e8p_gemv``) for Hopper (sm_90) with Triton's bundled
``ptxas``, disassembles it with ``nvdisasm`` (``gemv_sass.py``'s helpers) and counts the
instructions of its main loop per decoded weight, per thread: for one token on CUDA cores (the
dispatched path) with the points built from the 256 patterns and sign bits or looked up in the
full table, and on tensor cores (more tokens).

    python benchmarks/e8p_sass.py [--out benchmarks/results/e8p_sass.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import triton
import triton.language as tl
from gemv_sass import NVDISASM, main_loop
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

SIG = {"x_ptr": "*fp16", "first_ptr": "*i16", "second_ptr": "*i16", "t1_ptr": "*i16", "t2_ptr": "*fp16",
       "scale_ptr": "*fp32", "y_ptr": "*fp16", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32",
       "stride_ym": "i32", "resid": "fp32", "SPLIT": "i32"}
#: (rows, columns per step, warps, full table, tensor cores)
CONFIGS = ((16, 512, 4, False, False), (32, 256, 4, False, False), (32, 256, 4, True, False),
           (64, 128, 4, True, True))


def _loop(fn, sig: dict, const: dict, warps: int, per_thread: float) -> dict:
    """Compile ``fn`` for sm_90 and count its step loop's instructions per weight and thread."""
    sig = {**sig, **{k: "constexpr" for k in const}}
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 2})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([str(NVDISASM), "-c", f.name], capture_output=True, text=True, check=True).stdout
    loop = main_loop(text)
    return {"instructions_per_step": sum(loop.values()), "per_weight": sum(loop.values()) / per_thread,
            "top": dict(loop.most_common(10))}


def count(block_n: int, block_k: int, warps: int, full: bool, dot: bool) -> dict:
    from qf_quip.gemv import _e8p_gemv

    const = dict(BLOCK_N=block_n, BLOCK_K=block_k, ATOMIC=False, SECOND=0, DOT=dot, BLOCK_M=16, IEEE=False,
                 FULL=full, DT=tl.float16, FMA_M=1)
    sig = {**SIG, **({"t1_ptr": "*fp16"} if full else {})}
    return _loop(_e8p_gemv, sig, const, warps, block_n * block_k / (warps * 32))


BYTES_SIG = {"x_ptr": "*fp16", "codes_ptr": "*i16", "tab_ptr": "*i32", "scale_ptr": "*fp32", "y_ptr": "*fp16",
             "N": "i32", "K": "i32", "SPLIT": "i32"}


def count_bytes(block_n: int, block_k: int, warps: int) -> dict:
    """The same count for :func:`qf_quip.gemv._e8p_gemv_bytes` (one token, 2-D tiles)."""
    from qf_quip.gemv import _e8p_gemv_bytes

    return _loop(_e8p_gemv_bytes, BYTES_SIG, dict(BLOCK_N=block_n, BLOCK_K=block_k, ATOMIC=False), warps,
                 block_n * block_k / (warps * 32))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "e8p_sass.json")
    args = ap.parse_args()
    rows = {}
    for bn, bk, w, full, dot in CONFIGS:
        label = f"{bn}x{bk} w{w} {'full table' if full else 'patterns+signs'} {'tensor cores' if dot else 'CUDA cores'}"
        rows[label] = count(bn, bk, w, full, dot)
        print(label, f"{rows[label]['per_weight']:.1f} instructions per weight", rows[label]["top"], flush=True)
    for bn, bk, w in ((32, 256, 4), (16, 512, 4), (64, 256, 8)):
        label = f"{bn}x{bk} w{w} signed bytes, 2-D tiles (bytes=True) CUDA cores"
        rows[label] = count_bytes(bn, bk, w)
        print(label, f"{rows[label]['per_weight']:.1f} instructions per weight", rows[label]["top"], flush=True)
    args.out.write_text(json.dumps({"triton": triton.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

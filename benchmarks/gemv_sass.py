"""Issue 20: the machine code of the ``triton-w4a16`` GEMVs, counted without a GPU.

Compiles each tensor-core GEMV (``qf_triton.gemv._gemv_dot``: ``dot`` and ``dot_t``) and the
CUDA-core one (``_gemv``, ``fma``) for Hopper (sm_90) with Triton's bundled ``ptxas``,
disassembles it with ``nvdisasm`` and counts the instructions of its main loop (one step of
``BK`` input columns), per decoded weight code: ALU work per code is what bounds a GEMV once its
loads are in flight. ``h2`` (one row, paired 16-bit instructions from inline PTX) is counted
beside them. Also counts the loop's barriers and shared-memory stores (layout
conversions) — the first ``dot`` ran one per code position per step.

    python benchmarks/gemv_sass.py [--out benchmarks/results/gemv_sass.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

NVDISASM = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
SIG = {"x_ptr": "*fp16", "w_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "b_ptr": "*fp16", "y_ptr": "*fp16",
       "part_ptr": "*fp32", "M": "i32", "N": "i32", "stride_xm": "i32", "k_split": "i32", "LB": "i32", "LBK": "i32"}
INSTR = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")


#: arguments a real launch finds divisible by 16 (Triton specializes on it): the loads vectorize
ALIGNED = ("x_ptr", "xi_ptr", "w_ptr", "s_ptr", "z_ptr", "b_ptr", "y_ptr", "part_ptr", "N", "k_split", "LB", "LBK",
           "stride_xm")


def sass(fn, dtype: str, const: dict, warps: int, stages: int) -> str:
    sig = {**SIG, "x_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", **{k: "constexpr" for k in const}}
    if "xi_ptr" in fn.arg_names:  # h2: the input row also as int32 pairs; one row, no M or stride
        sig = {"xi_ptr": "*i32", **{k: v for k, v in sig.items() if k not in ("M", "stride_xm")}}
    sig = {a: sig[a] for a in fn.arg_names}
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in ALIGNED if a in fn.arg_names}
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([str(NVDISASM), "-c", f.name], capture_output=True, text=True, check=True).stdout


def main_loop(text: str) -> collections.Counter:
    """Opcode counts of the longest backward branch's body (the step loop)."""
    lines = text.splitlines()
    addr: dict[int, int] = {}
    labels: dict[str, int] = {}
    pending: list[str] = []
    for i, line in enumerate(lines):
        if m := re.match(r"\.L_x_(\d+):", line):
            pending.append(m.group(1))
        elif m := INSTR.match(line):
            addr[i] = int(m.group(1), 16)
            for lab in pending:
                labels[lab] = addr[i]
            pending = []
    best: list[str] = []
    for i, a in addr.items():
        m = re.search(r"BRA\s+`\(\.L_x_(\d+)\)", lines[i])
        if m and labels.get(m.group(1), a + 1) < a:
            body = [lines[j] for j, b in addr.items() if labels[m.group(1)] <= b <= a]
            best = max(best, body, key=len)
    return collections.Counter(INSTR.match(ln).group(2) for ln in best)


def main() -> None:
    from qf_triton import gemv

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rows = {}
    common = {"BITS": 4, "GROUP": 128, "BK": 128, "SYM": False, "SPLIT": True, "HAS_BIAS": False}
    cases = []
    for kind, swap in (("dot", False), ("dot_t", True)):
        for bn, warps in ((64, 4), (128, 8), (256, 8)):
            for dtype, pairs, magic, base in (("fp16", True, 0x6400, 1024.0), ("bf16", True, 0x4300, 128.0),
                                             ("fp16", False, 0, 0.0)):
                cases.append((f"{kind} {dtype} {'pairs' if pairs else 'float32 decode'} bn={bn} warps={warps}",
                              gemv._gemv_dot, dtype, bn, warps,
                              {**common, "BM": 16, "BN": bn, "SWAP": swap, "PAIRS": pairs, "MAGIC": magic, "BASE": base,
                               "WIDEN": False}))
    for bn in (128, 256):
        cases.append((f"fma fp16 bn={bn} warps=4", gemv._gemv, "fp16", bn, 4,
                      {**common, "BM": 1, "BN": bn, "INT_ZERO": True}))
    for dtype in ("fp16", "bf16"):
        for bn, warps, chain, prefetch in ((128, 2, 1, False), (256, 4, 1, False), (256, 4, 2, False),
                                           (256, 4, 2, True)):
            cases.append((f"h2 {dtype} bn={bn} warps={warps} chain={chain}{' prefetch' if prefetch else ''}",
                          gemv._gemv_h2, dtype, bn, warps,
                          {"GROUP": 128, "BN": bn, "BK": 128, "SYM": False, "SPLIT": True, "HAS_BIAS": False,
                           "EVEN_N": True, "BF16": dtype == "bf16", "WIDEN": False, "CHAIN": chain,
                           "PREFETCH": prefetch}))
    for label, fn, dtype, bn, warps, const in cases:
        ops = main_loop(sass(fn, dtype, const, warps, 3))
        codes = const["BK"] * bn / (32 * warps)  # decoded codes per thread per step
        rows[label] = {"per_code": round(sum(ops.values()) / codes, 2), "loop": sum(ops.values()),
                       "barriers": ops["BAR"], "shared_stores": ops["STS"], "top": dict(ops.most_common(8))}
        print(f"{label:48} {rows[label]['per_code']:5.2f} instr/code  {ops['BAR']:3d} BAR  {ops['STS']:3d} STS  "
              f"{dict(ops.most_common(6))}", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"triton": triton.__version__, "target": "sm_90", "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

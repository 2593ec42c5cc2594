"""Issue 19: W8A8 linears through PyTorch's int8 and fp8 GEMMs (kernel ``torch-w8a8``) against the
same linear in fp16/bf16 (cuBLAS through ``F.linear``), side by side on one GPU, at batch
(tokens) 1–256, on Llama-7B/8B linear shapes.

Each W8A8 row includes the per-token quantization of the input (dynamic schemes) or its static
scaling, the low-precision GEMM and the rescale — what one call of ``QuantLinear`` costs — with
the kernel's Triton quantization/rescale (``fuse=true``) and with torch ops for them (the
default, ``fuse=false``: the ``_torchops`` columns). Times:
median of CUDA-event timings of 50 calls after 10 warm-up calls, each case replayed from a CUDA
graph (launch overhead out of both sides alike).

    python benchmarks/w8a8_speed.py --out benchmarks/results/cuda/w8a8_speed_h100.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import quantfoundry as qf
import torch
import torch.nn.functional as F
from quantfoundry.roles.kernel import QuantLinear
from quantfoundry.toolkit import select_kernel

SHAPES = {"q/o 4096x4096": (4096, 4096), "gate/up 14336x4096": (14336, 4096), "down 4096x14336": (4096, 14336)}
TOKENS = (1, 16, 64, 256)
SCHEMES = (("int8-sym", "int8"), ("int8-sym", "int8-static"), ("fp8-e4m3", "fp8"), ("fp8-e4m3", "fp8-static"))


def timed(fn, x: torch.Tensor, reps: int = 50, inner: int = 1) -> float:
    """Median milliseconds of ``fn(x)`` replayed from a CUDA graph of ``inner`` calls (per call)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(10):
            fn(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn(x)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / inner)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    dev = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    kernels = {"": select_kernel(qf.resolve_format("int8-sym"), dev, "torch-w8a8", {"fuse": "true"}),
               "_torchops": select_kernel(qf.resolve_format("int8-sym"), dev, "torch-w8a8", {"fuse": "false"})}
    rows: dict[str, dict] = {}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for label, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device=dev) * 0.02
        dense = w.to(dtype)
        for spec, act_spec in SCHEMES:
            qw = qf.resolve_format(spec).quantize(w)
            act = qf.ActQuant.from_spec(act_spec)
            qw.input_quant = act
            if not act.dynamic:
                qw.input_scale = act.scale_for(torch.tensor([3.0], device=dev))
            for tag, kernel in kernels.items():
                ql = QuantLinear(qw.to(dev), None, kernel).to(dev)
                for m in TOKENS:
                    x = torch.randn(m, k, device=dev, dtype=dtype)
                    key = f"{label}|{m}"
                    row = rows.setdefault(key, {"dense_ms": timed(lambda t, d=dense: F.linear(t, d), x)})
                    row[f"{spec}+{act_spec}{tag}_ms"] = ms = timed(ql, x)
                    row[f"{spec}+{act_spec}{tag}_speedup"] = row["dense_ms"] / ms
                    print(key, f"{spec}+{act_spec}{tag}", f"{row['dense_ms']:.4f} ms dense, {ms:.4f} ms, "
                          f"x{row['dense_ms'] / ms:.2f}", flush=True)
        out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": args.dtype, "rows": rows}
        args.out.write_text(json.dumps(out, indent=1))  # after every shape: a cut run keeps what it measured


if __name__ == "__main__":
    main()

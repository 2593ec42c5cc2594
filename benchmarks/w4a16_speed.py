"""Issue 20: 4-bit weight-only linears on the GPU, side by side in one run — our Triton kernel
(``triton-w4a16``, fused dequantization), PyTorch's int4 kernel (``torch-int4``,
``aten._weight_int4pack_mm``), the dispatching ``QuantLinear`` (the kernel chosen per call)
and cuBLAS (``F.linear`` with the float weight) — on the linear shapes of Llama-3-8B and
Llama-3-70B at 1–256 tokens per call.

Times: median of CUDA-event timings of 50 replays of a CUDA graph of the call, after 10 warm-up
calls (no Python launch overhead on either side). ``--cold``: each variant gets copies of its
weight (different memory) until they span four times the GPU's L2 cache, and one graph calls
every copy in turn — the weights are read from memory, not from L2 (a 4096x4096 int4 weight is
8 MB; the H100's L2 holds 50 MB), as a decoding model's layers are, and the graph's launch is
spread over the calls. Bandwidth: the weight's stored bytes (codes,
scales, zero points) over the time, against the int4-g128 roofline at the measured copy
bandwidth of the device.

    python benchmarks/w4a16_speed.py --out benchmarks/results/cuda/w4a16_speed_h100.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import quantfoundry as qf
import torch
import torch.nn.functional as F
from quantfoundry.roles.kernel import QuantLinear
from quantfoundry.toolkit import select_kernels
from w8a8_speed import timed

SHAPES = {
    "8B q/o 4096x4096": (4096, 4096), "8B kv 1024x4096": (1024, 4096), "8B gate_up 28672x4096": (28672, 4096),
    "8B down 4096x14336": (4096, 14336), "70B q/o 8192x8192": (8192, 8192), "70B gate_up 57344x8192": (57344, 8192),
    "70B down 8192x28672": (8192, 28672),
}
TOKENS = (1, 4, 16, 64, 256)


def copy_bandwidth(dev: torch.device) -> float:
    """Bytes per second of a device-to-device copy of 1 GiB (read + write)."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    ms = timed(lambda t: b.copy_(t), a, reps=20)
    return 2 * a.numel() / (ms / 1e3)


def write_rows(path: Path, bandwidth: float, rows: dict) -> None:
    """The results file of a GPU speed run: device, torch, copy bandwidth and the rows so far."""
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_TBps": bandwidth / 1e12,
           "rows": rows}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))


def timed_cold(calls: list, x: torch.Tensor, reps: int = 20) -> float:
    """Median milliseconds per call of one CUDA graph calling each of ``calls`` on ``x`` in turn."""
    return timed(lambda t: [c(t) for c in calls], x, reps=reps, inner=1) / len(calls)


def copies_for(nbytes: int, dev: torch.device) -> int:
    """Copies of an ``nbytes`` weight that span four times the L2 cache (at least 2)."""
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 << 20)
    return max(2, -(-4 * l2 // nbytes))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    ap.add_argument("--cold", action="store_true", help="rotate weight copies that span 4x the L2 cache")
    args = ap.parse_args()
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    ours_fmt, tiny_fmt = qf.resolve_format("int4-g128"), qf.resolve_format("int4-g128-sym-sbf16")
    triton_k = qf.get_component("kernel", "triton-w4a16")(qf.get_component("kernel", "triton-w4a16").Options())
    int4_k = qf.get_component("kernel", "torch-int4")(qf.get_component("kernel", "torch-int4").Options())
    rows: dict[str, dict] = {}
    for label in args.shapes:
        n, k = SHAPES[label]
        w = torch.randn(n, k, device=dev) * 0.02
        qw = ours_fmt.quantize(w)
        nbytes = qw.nbytes()
        copies = copies_for(nbytes, dev) if args.cold else 1
        linears: dict[str, tuple[list, torch.dtype]] = {name: ([], dt) for name, dt in (
            ("triton", torch.float16), ("triton_bf16", torch.bfloat16), ("dispatch", torch.float16),
            ("tinygemm_bf16", torch.bfloat16))}
        dense: dict[torch.dtype, list[torch.Tensor]] = {torch.float16: [], torch.bfloat16: []}
        for i in range(copies):
            if i:
                w = torch.randn(n, k, device=dev) * 0.02
                qw = ours_fmt.quantize(w)
            qt = tiny_fmt.quantize(w)
            linears["triton"][0].append(QuantLinear(qw, None, triton_k))
            linears["triton_bf16"][0].append(QuantLinear(qw, None, triton_k))
            linears["dispatch"][0].append(QuantLinear(qw, None, select_kernels(ours_fmt, dev)))
            linears["tinygemm_bf16"][0].append(QuantLinear(qt, None, int4_k))
            dense[torch.float16].append(w.half())
            dense[torch.bfloat16].append(w.bfloat16())
            del w
        for m in args.tokens:
            row: dict[str, float | str] = {"copies": copies}
            for dt, tag in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
                x = torch.randn(m, k, device=dev, dtype=dt)
                fns = [lambda t, d=d: F.linear(t, d) for d in dense[dt]]
                row[f"cublas_{tag}_us"] = 1e3 * timed_cold(fns, x)
            for name, (lins, dt) in linears.items():
                x = torch.randn(m, k, device=dev, dtype=dt)
                us = 1e3 * timed_cold(lins, x)
                row[f"{name}_us"] = us
                base = row["cublas_fp16_us" if dt == torch.float16 else "cublas_bf16_us"]
                row[f"{name}_speedup"] = base / us
                if name == "dispatch":
                    row["dispatch_kernel"] = lins[0].kernel_for(m).name
            row["triton_GBps"] = nbytes / (row["triton_us"] * 1e-6) / 1e9
            row["roofline_speedup_fp16"] = (2 * n * k) / nbytes  # bytes ratio: the memory-bound limit
            rows[f"{label}|{m}"] = row
            print(f"{label} m={m}: cuBLAS fp16 {row['cublas_fp16_us']:.1f} us, triton {row['triton_us']:.1f} us "
                  f"(x{row['triton_speedup']:.2f}, {row['triton_GBps']:.0f} GB/s), tinygemm bf16 "
                  f"{row['tinygemm_bf16_us']:.1f} us (x{row['tinygemm_bf16_speedup']:.2f}), dispatch "
                  f"x{row['dispatch_speedup']:.2f} [{row['dispatch_kernel']}] ({copies} copies)", flush=True)
        del linears, dense, qw
        torch.cuda.empty_cache()
        write_rows(args.out, bw, rows)  # after every shape: a cut run keeps what it measured


if __name__ == "__main__":
    main()

"""Issue 22: QuIP#'s 2-bit (and RVQ 4-bit) linears on the GPU at decode batch sizes, side by
side in one run: the ``triton-e8p`` GEMV on the stored weight alone, the whole QuIP# linear
(``QuantLinear``: the kernel's Triton Hadamard transforms on the input and the output around
the GEMV; the torch path's time for them beside),
and cuBLAS (``F.linear`` with the float16 weight) — on the linear shapes of Llama-3-8B and
Llama-3-70B at 1, 4 and 16 tokens.

Times: median of CUDA-event timings of 50 replays of a CUDA graph of the call, after 10 warm-up
calls (``w8a8_speed.timed``); at one token of ``e8p`` also the opt-in GEMV on 2-D tiles
(``gemv_bytes_us``, ``E8PConfig(bytes=True)``). ``--tune`` also times a grid of GEMV tiles and splits at each
shape and token count and records the best (the kernel's default pick is what ``gemv_us``
measures).

    python benchmarks/e8p_speed.py --out benchmarks/results/cuda/e8p_speed_h100.json [--tune]
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import replace
from pathlib import Path

import quantfoundry as qf
import torch
import torch.nn.functional as F
from quantfoundry import HadamardTransform, QuantizedWeight
from quantfoundry.roles.kernel import QuantLinear
from w4a16_speed import SHAPES, copy_bandwidth, write_rows
from w8a8_speed import timed

TOKENS = (1, 4, 16)
#: ``--tune``'s grid at one token (a wider one — the full table, tensor cores at one token, 128-column
#: steps — measured slower everywhere on the H100: results/cuda/e8p_tune_signs_h100.json)
GRID = [dict(block_n=bn, block_k=bk, split=s, warps=w)
        for bn, bk, s, w in itertools.product((16, 32, 64), (256, 512), (1, 2, 4, 8), (4, 8))
        if not (w == 8 and bn == 16)]


def random_weight(spec: str, n: int, k: int, dev: torch.device, transforms: bool) -> QuantizedWeight:
    """Uniformly random codes of ``spec`` with a unit scale (speed does not depend on the values)."""
    fmt = qf.resolve_format(spec)
    bits = fmt.options.bits
    codes = torch.randint(0, 1 << min(8 * bits, 62), (n, k // 8), device=dev, dtype=torch.int64)
    t = (HadamardTransform.random((n, k), seed=1).to(dev),) if transforms else ()
    return QuantizedWeight(fmt, (n, k), torch.float16, fmt.pack(codes), {},
                           tensor_params={"scale": torch.ones(1, device=dev)}, transforms=t)


def table(data: dict) -> str:
    """The docs' table: per shape, spec and token count, cuBLAS, the GEMV alone and the whole
    linear (with its transforms), with speedups against cuBLAS fp16."""
    lines = ["| shape | spec | tokens | cuBLAS fp16 µs | GEMV µs | GEMV × | GEMV GB/s | linear µs | linear × | bytes × |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, r in data["rows"].items():
        shape, spec, m = key.split("|")
        lines.append(f"| {shape} | {spec} | {m} | {r['cublas_fp16_us']:.1f} | {r['gemv_us']:.1f} | "
                     f"{r['gemv_speedup']:.2f} | {r['gemv_GBps']:.0f} | {r['linear_us']:.1f} | "
                     f"{r['linear_speedup']:.2f} | {r['roofline_speedup_fp16']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--table", type=Path, help="print the docs' table of a results file and stop")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--specs", nargs="+", default=["e8p", "e8p-rvq4"])
    ap.add_argument("--tune", action="store_true")
    args = ap.parse_args()
    if args.table is not None:
        print(table(json.loads(args.table.read_text())))
        return
    if args.out is None:
        ap.error("--out is required (or --table)")
    from qf_quip.gemv import E8PConfig, default_config, gemv
    from qf_quip.rht import rht

    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    kernel = qf.get_component("kernel", "triton-e8p")(qf.get_component("kernel", "triton-e8p").Options())
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    rows: dict[str, dict] = {}
    for label in args.shapes:
        n, k = SHAPES[label]
        dense = torch.randn(n, k, device=dev, dtype=torch.float16) * 0.02
        for spec in args.specs:
            bare = random_weight(spec, n, k, dev, transforms=False)
            full = QuantLinear(random_weight(spec, n, k, dev, transforms=True), None, kernel)
            state = kernel.prepare(bare)
            p = state["packed"]
            for m in TOKENS if spec == "e8p" else (1,):
                x = torch.randn(m, k, device=dev, dtype=torch.float16)
                row: dict[str, float | str] = {"cublas_fp16_us": 1e3 * timed(lambda t, d=dense: F.linear(t, d), x)}
                cfg = default_config(m, n, k, sms)
                row["default_config"] = str(cfg)
                row["gemv_us"] = 1e3 * timed(lambda v, c=cfg, pk=p: gemv(v, pk, c), x)
                if spec == "e8p" and m == 1:  # the opt-in layout on 2-D tiles (signed bytes)
                    cfg_bytes = replace(cfg, bytes=True)
                    row["gemv_bytes_us"] = 1e3 * timed(lambda v, c=cfg_bytes, pk=p: gemv(v, pk, c), x)
                row["linear_us"] = 1e3 * timed(full, x)
                t = full.qweight.transforms[0]
                y = torch.randn(m, n, device=dev, dtype=torch.float16)
                s_in, s_out = t.signs("in"), t.signs("out")
                row["rht_us"] = (1e3 * timed(lambda v, s=s_in: rht(v, s, inverse=False), x)
                                 + 1e3 * timed(lambda v, s=s_out: rht(v, s, inverse=True), y))
                row["rht_torch_us"] = 1e3 * timed(t.apply_input, x) + 1e3 * timed(t.apply_output, y)
                if args.tune and spec == "e8p" and m == 1:
                    best = (row["gemv_us"], str(cfg))
                    for g in GRID:
                        c = E8PConfig(**g)
                        if c.split > 1 and k % (c.block_k * c.split):
                            continue
                        try:
                            us = 1e3 * timed(lambda v, c=c, pk=p: gemv(v, pk, c), x, reps=20)
                        except Exception as exc:  # a tile the compiler refuses (resources): skip it
                            print(f"  {c}: {type(exc).__name__}", flush=True)
                            continue
                        best = min(best, (us, str(c)))
                    row["tuned_us"], row["tuned_config"] = best
                nbytes = bare.nbytes()
                row["gemv_speedup"] = row["cublas_fp16_us"] / row["gemv_us"]
                row["linear_speedup"] = row["cublas_fp16_us"] / row["linear_us"]
                row["gemv_GBps"] = nbytes / (row["gemv_us"] * 1e-6) / 1e9
                row["roofline_speedup_fp16"] = (2 * n * k) / nbytes
                rows[f"{label}|{spec}|{m}"] = row
                print(f"{label} {spec} m={m}: cuBLAS {row['cublas_fp16_us']:.1f} us, GEMV {row['gemv_us']:.1f} us "
                      f"(x{row['gemv_speedup']:.2f}, {row['gemv_GBps']:.0f} GB/s), linear {row['linear_us']:.1f} us "
                      f"(x{row['linear_speedup']:.2f}), transforms {row['rht_us']:.1f} us"
                      + (f", tuned {row['tuned_us']:.1f} us {row['tuned_config']}" if "tuned_us" in row else ""), flush=True)
            del bare, full, state, p
        del dense
        torch.cuda.empty_cache()
        write_rows(args.out, bw, rows)  # after every shape: a cut run keeps what it measured


if __name__ == "__main__":
    main()

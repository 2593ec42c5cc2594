"""AWQ (issue 7): quality of qf's ``awq`` against RTN and GPTQ on the same grid, calibrating on
the first 60% of the model's in-domain text (128 × 512 tokens, seed 0, the GPTQ benchmark's
split) and scoring KL against the original on the held-out 40% — and on the other text, to
see which method generalises across domains. Variants of AWQ's options (duo scaling,
clipping) are rows of their own.

The peer (``llm-compressor``: llm-compressor's ``AWQModifier`` + ``QuantizationModifier``, its
defaults — duo scaling, 20 grid points, no clipping search) runs in its own virtualenv through
``benchmarks/peers/llmc_awq.py`` on the very same calibration ids; its folded norms and
dequantized linears are loaded into the original architecture and scored by the same code.
Its time is its ``oneshot`` call; qf's is the whole ``qf.run`` (load, calibration, blocks).
SmolLM2's 576-wide linears take no g128 in the peer: g64 there. ``awq+gptq`` is a recipe (issue
15): AWQ's scale search as a transform (``awq`` before another quantizer: no clipping), then
GPTQ's rounding on the scaled weights.

    python benchmarks/awq_quality.py --models pycode-7m [--methods awq llm-compressor]
    python benchmarks/awq_quality.py --table-only
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import quantfoundry as qf
from _common import load_rows, save_rows
from gptq_vs_peer import calibration_ids, evaluate, run_peer, split_text
from rtn_sweep import TEXTS, model_folder

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "awq_quality.json"
OTHER = {"pycode-7m": "wikitext2", "smollm2-135m": "python"}
FORMATS = {"pycode-7m": ("int4-g128", "int3-g128"), "smollm2-135m": ("int4-g64", "int3-g64")}
PEER = "llm-compressor"
#: method label → (quantizer, options), or (a list of (stage, options), {}) for a recipe
METHODS: dict[str, tuple[str | list[tuple[str, dict[str, Any]]], dict[str, Any]]] = {
    "rtn": ("rtn", {}),
    "gptq": ("gptq", {}),
    "awq": ("awq", {}),
    "awq-duo": ("awq", {"duo_scaling": True}),
    "awq-noclip": ("awq", {"clip": False}),
    "awq-duo-noclip": ("awq", {"duo_scaling": True, "clip": False}),  # the peer's settings
    "awq-duo-noclip-nogqa": ("awq", {"duo_scaling": True, "clip": False, "fold_gqa": False}),  # + its mappings
    "awq+gptq": ([("awq", {}), ("gptq", {})], {}),  # AWQ's scales, then GPTQ's rounding (a recipe)
    PEER: ("", {}),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["pycode-7m"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--formats", nargs="+", help="default: the model's two (FORMATS)")
    ap.add_argument("--peer-python", default="/work/venvs/llmc/bin/python")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--results", type=Path, default=RESULTS, help="rows file (resumable)")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    rows: dict[str, Any] = load_rows(args.results)

    def save() -> None:
        save_rows(args.results, rows)

    if not args.table_only:
        for model in args.models:
            calib, held = split_text(model)
            other = TEXTS[OTHER[model]]
            for fmt in args.formats or FORMATS[model]:
                for method in args.methods:
                    key = f"{model}|{fmt}|{method}"
                    if key in rows:
                        continue
                    print(key, flush=True)
                    quantizer, opts = METHODS[method]
                    extra: dict[str, Any] = {"device": args.device}
                    if method == PEER:
                        info, m = run_peer(model, fmt, calibration_ids(model, calib), args.peer_python,
                                           args.device, script="llmc_awq.py", tag="awq")
                        seconds = info["seconds"]
                        extra["peer"] = {k: info.get(k) for k in ("versions", "settings")}
                        extra["peer_mappings"] = {k: info["awq_mappings"][k] for k in ("n_resolved", "n_skipped")}
                    else:
                        t0 = time.perf_counter()
                        m = qf.run(str(model_folder(model)), quantizer=quantizer, quantizer_options=opts or None,
                                   format=fmt, out=None, keep_model=True, progress=False, device=args.device,
                                   calibrator_options={"path": str(calib), "n_samples": 128, "seq_len": 512}
                                   if quantizer != "rtn" else None).model
                        seconds = time.perf_counter() - t0
                    rows[key] = {"seconds": seconds, "in_domain": evaluate(model, m, held),
                                 "other": evaluate(model, m, other), **extra}
                    del m
                    save()
    print(table(rows))


def table(rows: dict[str, Any]) -> str:
    lines = ["| model | format | method | KL in-domain (held out) | top-1 % | ppl (orig.) | KL other text | top-1 % "
             "| ppl (orig.) | time s |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key, r in sorted(rows.items()):
        model, fmt, method = key.split("|")
        a, b = r["in_domain"], r["other"]
        lines.append(f"| {model} | {fmt} | {method} | {a['kl_mean']:.4f} | {a['same_top1_pct']:.2f} | "
                     f"{a['ppl_quantized']:.3f} ({a['ppl_original']:.3f}) | {b['kl_mean']:.4f} | "
                     f"{b['same_top1_pct']:.2f} | {b['ppl_quantized']:.2f} ({b['ppl_original']:.2f}) | "
                     f"{r['seconds']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

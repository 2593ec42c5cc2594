"""Issue 18: NF4 (bitsandbytes' layout, plugin ``qf-nf4``) reached by RTN — bitsandbytes' own
result, byte for byte — and by GPTQ, AWQ and HQQ (its scale optimised) through the Format
interface, with and without double quantization (``nf4-dq``, 4.127 bits), beside ``int4-g64``
(asymmetric, float16 scale, integer zero point). A method that cannot drive a format (HQQ on
``nf4-dq``, whose absmax is itself quantized) is left out.

Protocol: the core's defaults — calibration on ``python_calib.txt`` (128 x 512 tokens, seed 0),
``kl`` against the original on the held-out ``python_eval.txt`` (pycode-7m's own domain) and on
``english_eval.txt`` (WikiText articles 0-11), 16,384 tokens each, and ``size``. Time: the whole
``qf.run`` (calibration, quantization, evaluation), on a machine doing other work.

    python benchmarks/nf4_quality.py [--models pycode-7m] [--device cpu]
    python benchmarks/nf4_quality.py --table-only
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import quantfoundry as qf
from _common import parse_results_args, save_rows
from quantfoundry.data import default_eval_text, english_eval_text
from rtn_sweep import model_folder

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "nf4_quality.json"
METHODS = ("rtn", "gptq", "awq", "hqq")
FORMATS = ("nf4", "nf4-dq", "int4-g64")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["pycode-7m"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--formats", nargs="+", default=list(FORMATS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    parsed = parse_results_args(ap, RESULTS, table)
    if parsed is None:
        return
    args, rows = parsed
    texts = {"python": default_eval_text(), "wikitext": english_eval_text()}
    for model, fmt, method in itertools.product(args.models, args.formats, args.methods):
        key = f"{model}|{fmt}|{method}"
        if key in rows:
            continue
        evaluators: list[tuple[str, dict[str, Any]]] = [
            ("kl", {"path": str(p), "max_tokens": args.eval_tokens}) for p in texts.values()]
        evaluators.append(("size", {}))
        if qf.get_component("quantizer", method)().check_format(qf.resolve_format(fmt)):
            continue
        t0 = time.perf_counter()
        r = qf.run(str(model_folder(model)), quantizer=method, format=fmt, out=None, progress=False,
                   device=args.device, evaluators=evaluators)
        seconds = time.perf_counter() - t0
        row: dict[str, Any] = {"seconds": round(seconds, 1), "device": args.device,
                               "linear_bpw": r.metrics["size"]["linear_bpw"]["quantized"]}
        for side, path in texts.items():
            m = next(v for k, v in r.metrics.items() if k.startswith("kl[") and Path(path).name in k)
            row[side] = {k: m[k]["quantized"] for k in ("kl_mean", "same_top1_pct", "ppl_quantized", "ppl_original")}
        rows[key] = row
        save_rows(args.results, rows)
        print(key, json.dumps(row), flush=True)
    print(table(rows))


def table(rows: dict[str, Any]) -> str:
    lines = ["| model | format | method | linear bpw | KL Python (held out) | top-1 % | ppl (orig.) | KL WikiText | "
             "top-1 % | time s |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key, r in rows.items():
        model, fmt, method = key.split("|")
        a, b = r["python"], r["wikitext"]
        lines.append(f"| {model} | {fmt} | {method} | {r['linear_bpw']:.3f} | {a['kl_mean']:.4f} | "
                     f"{a['same_top1_pct']:.2f} | {a['ppl_quantized']:.3f} ({a['ppl_original']:.3f}) | "
                     f"{b['kl_mean']:.4f} | {b['same_top1_pct']:.2f} | {r['seconds']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

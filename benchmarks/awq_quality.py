"""AWQ (issue 7): quality of qf's ``awq`` against RTN and GPTQ on the same grid, calibrating on
the first 60% of the model's in-domain text (128 × 512 tokens, seed 0, the GPTQ benchmark's
split) and scoring KL against the original on the held-out 40% — and on the other text, to
see which method generalises across domains. Variants of AWQ's options (duo scaling,
clipping) are rows of their own.

    python benchmarks/awq_quality.py --models pycode-7m [--variants default duo noclip]
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
from gptq_vs_peer import evaluate, split_text
from rtn_sweep import TEXTS, model_folder

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "awq_quality.json"
OTHER = {"pycode-7m": "wikitext2", "smollm2-135m": "python"}
FORMATS = ("int4-g128", "int3-g128")
#: method label → (quantizer, options)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "rtn": ("rtn", {}),
    "gptq": ("gptq", {}),
    "awq": ("awq", {}),
    "awq-duo": ("awq", {"duo_scaling": True}),
    "awq-noclip": ("awq", {"clip": False}),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["pycode-7m"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--formats", nargs="+", default=list(FORMATS))
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    rows: dict[str, Any] = load_rows(RESULTS)

    def save() -> None:
        save_rows(RESULTS, rows)

    if not args.table_only:
        for model in args.models:
            calib, held = split_text(model)
            other = TEXTS[OTHER[model]]
            for fmt in args.formats:
                for method in args.methods:
                    key = f"{model}|{fmt}|{method}"
                    if key in rows:
                        continue
                    print(key, flush=True)
                    quantizer, opts = METHODS[method]
                    t0 = time.perf_counter()
                    r = qf.run(str(model_folder(model)), quantizer=quantizer, quantizer_options=opts, format=fmt,
                               out=None, keep_model=True, progress=False,
                               calibrator_options={"path": str(calib), "n_samples": 128, "seq_len": 512}
                               if quantizer != "rtn" else None)
                    seconds = time.perf_counter() - t0
                    rows[key] = {"seconds": seconds, "in_domain": evaluate(model, r.model, held),
                                 "other": evaluate(model, r.model, other)}
                    save()
    print(table(rows))


def table(rows: dict[str, Any]) -> str:
    lines = ["| model | format | method | KL in-domain (held out) | top-1 % | KL other text | top-1 % | time s |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for key, r in sorted(rows.items()):
        model, fmt, method = key.split("|")
        a, b = r["in_domain"], r["other"]
        lines.append(f"| {model} | {fmt} | {method} | {a['kl_mean']:.4f} | {a['same_top1_pct']:.2f} | "
                     f"{b['kl_mean']:.4f} | {b['same_top1_pct']:.2f} | {r['seconds']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

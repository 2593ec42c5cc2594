"""Evaluator sweep (issue 4): RTN quality by perplexity under both protocols, KL and top-1 flips.

For pycode-7m and SmolLM2-135M (Q4_1-dequantized baseline), on WikiText-2 (test) and on the
held-out CPython code sample, for rtn × int8 / int4-g128 / int4-g32 / int3-g128, through the
public API (``quantfoundry.run``, in-memory quantized model, no artifact written):

* ``kl`` (core protocol: non-overlapping windows of min(context, 2048), no BOS): mean, p99 KL,
  same-top-1 %, and the perplexity of both models on the same positions (= the core-protocol
  perplexity);
* ``perplexity protocol=llama.cpp`` (ctx 512, BOS first, second half of each window scored);
* ``size``: bits per weight of the quantized linears.

The original's side comes from the on-disk reference cache (computed once per model and text).
Rows are saved as they finish; a rerun computes only what is missing. SmolLM2 uses the first
``--smol-tokens`` tokens of each text (default 16,384) to keep the 2-core CPU run short.

    python benchmarks/eval_sweep.py [--models pycode-7m smollm2-135m] [--table-only]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import quantfoundry
from _common import core_version, cpu_name
from quantfoundry.evaluation.compare import plot
from rtn_sweep import TEXTS, model_folder

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "eval_sweep.json"
DOCS = HERE.parent / "docs"
MODELS = ["pycode-7m", "smollm2-135m"]
FORMATS = ["int8", "int4-g128", "int4-g32", "int3-g128"]
SWEEP_TEXTS = ["wikitext2", "python"]


def measure(model: str, text: str, fmt: str, max_tokens: int) -> dict[str, Any]:
    path = str(TEXTS[text])
    t0 = time.perf_counter()
    r = quantfoundry.run(str(model_folder(model)), quantizer="rtn", format=fmt, out=None, progress=False,
                         evaluators=[("kl", {"path": path, "max_tokens": max_tokens}),
                                     ("perplexity", {"path": path, "protocol": "llama.cpp", "ctx": 512,
                                                     "max_tokens": max_tokens}),
                                     ("size", {})])
    m = r.metrics

    def q(ev: str, name: str, col: str = "quantized") -> Any:
        return m[ev][name].get(col)

    return {
        "format": fmt, "linear_bpw": q("size", "linear_bpw"),
        "ppl_core": q("kl", "ppl_quantized"), "ppl_core_original": q("kl", "ppl_original"),
        "ppl_llama_cpp": q("perplexity", "perplexity"), "ppl_llama_cpp_original": q("perplexity", "perplexity", "original"),
        "kl_mean": q("kl", "kl_mean"), "kl_median": q("kl", "kl_median"), "kl_p99": q("kl", "kl_p99"),
        "kl_max": q("kl", "kl_max"), "same_top1_pct": q("kl", "same_top1_pct"),
        "tail_mass_mean": q("kl", "tail_mass_mean"), "kl_tokens": q("kl", "tokens"),
        "llama_cpp_tokens": q("perplexity", "tokens"), "ctx_core": q("kl", "ctx"),
        "text_sha256": q("kl", "text_sha256"), "fallbacks": [n for n in r.notes if n.startswith("fallback")],
        "seconds": round(time.perf_counter() - t0, 1),
    }


def render(data: dict[str, Any]) -> str:
    out = ["| model | text | format | bpw | ppl core | ppl llama.cpp | KL mean | KL p99 | same top-1 % |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for model in MODELS:
        for text in SWEEP_TEXTS:
            rows = [data["rows"][k] for k in sorted(data["rows"]) if k.startswith(f"{model}/{text}/")]
            if not rows:
                continue
            o = rows[0]
            out.append(f"| {model} | {text} | original | 16 | {o['ppl_core_original']:.3f} | "
                       f"{o['ppl_llama_cpp_original']:.3f} | 0 | 0 | 100 |")
            for fmt in FORMATS:
                r = data["rows"].get(f"{model}/{text}/{fmt}")
                if r:
                    out.append(f"| {model} | {text} | rtn {fmt} | {r['linear_bpw']:.3f} | {r['ppl_core']:.3f} | "
                               f"{r['ppl_llama_cpp']:.3f} | {r['kl_mean']:.5f} | {r['kl_p99']:.4f} | "
                               f"{r['same_top1_pct']:.2f} |")
    return "\n".join(out) + "\n"


def plots(data: dict[str, Any]) -> None:
    for model in MODELS:
        rows = [data["rows"].get(f"{model}/python/{f}") for f in FORMATS]
        if not all(rows):
            continue
        o = rows[0]
        prow = [{"variant": "original", "quantizer": "original", "bpw": 16.0, "perplexity": o["ppl_core_original"],
                 "kl_mean": 0.0}]
        prow += [{"variant": f"rtn {r['format']}", "quantizer": "rtn", "bpw": r["linear_bpw"],
                  "perplexity": r["ppl_core"], "kl_mean": r["kl_mean"]} for r in rows]
        plot(prow, DOCS / f"compare-{model}.png",
             f"{model}: RTN quality vs size (held-out Python code, core protocol, {o['kl_tokens']:,} scored tokens)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--smol-tokens", type=int, default=16_384)
    ap.add_argument("--table-only", action="store_true")
    a = ap.parse_args()
    data = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"rows": {}}
    meta = {"cpu": cpu_name(), "threads": os.cpu_count(), **core_version()}  # the code this process runs
    if not a.table_only:
        for model in a.models:
            for text in SWEEP_TEXTS:
                for fmt in FORMATS:
                    key = f"{model}/{text}/{fmt}"
                    if key in data["rows"]:
                        continue
                    row = measure(model, text, fmt, 50_000 if model == "pycode-7m" else a.smol_tokens)
                    data["rows"][key] = {**row, "measured_with": meta}
                    RESULTS.parent.mkdir(exist_ok=True)
                    RESULTS.write_text(json.dumps(data, indent=1) + "\n")
                    print(key, {k: data["rows"][key][k] for k in ("ppl_core", "ppl_llama_cpp", "kl_mean", "seconds")},
                          flush=True)
    table = render(data)
    (HERE / "results" / "eval_sweep.md").write_text(table)
    plots(data)
    print(table)


if __name__ == "__main__":
    main()

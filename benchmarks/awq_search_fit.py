"""Issue 21: AWQ's searches ranked by qf-gguf's search kernels (the default, ``exact_search=false``)
against the exact fits — how often the chosen α and clip are the same, and how much worse the
exact objective is at the choice of the search kernels where they differ.

One AWQ → Q4_K_M run of each model (``gguf_profile.py``'s calibration: 128 × 512 tokens of the
first 60% of the in-domain text) on the CPU, with ``qf_awq``'s two searches wrapped: every call
runs once as the run does (search kernels) and once with the exact fits on the same inputs, and
the exact objective of both choices is kept (``ScaleResult.losses``, ``ClipResult.losses``: the
objective of every candidate). The run goes on with the default's choice, so every later block
sees what a default run sees.

    python benchmarks/awq_search_fit.py [--models pycode-7m]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "awq_search_fit.json"


def measure(model: str) -> dict:
    import qf_awq.quantizer as awq
    import quantfoundry
    from gptq_vs_peer import split_text
    from rtn_sweep import model_folder

    scale_rows, clip_rows = [], []
    search_scale, search_clip = awq.search_scale, awq.search_clip

    def fmt_name(formats):
        return "+".join(sorted({f.spec for f in formats if f is not None}))

    def scale(weights, formats, *args, exact=False, **kwargs):
        fast = search_scale(weights, formats, *args, exact=exact, **kwargs)
        ref = search_scale(weights, formats, *args, exact=True, **kwargs)
        i = round(fast.alpha * len(ref.losses))
        best = float(ref.losses.min())
        scale_rows.append({"format": fmt_name(formats), "same": fast.alpha == ref.alpha,
                           "excess": float(ref.losses[i]) / best - 1 if best > 0 else 0.0})
        return fast

    def clip(w, fmt, *args, exact=False, **kwargs):
        fast = search_clip(w, fmt, *args, exact=exact, **kwargs)
        ref = search_clip(w, fmt, *args, exact=True, **kwargs)
        at_fast = float(ref.losses.gather(0, fast.best[None]).sum())
        clip_rows.append({"format": fmt.spec, "units": fast.best.numel(),
                          "same_units": int((fast.best == ref.best).sum()),
                          "excess": at_fast / ref.loss_after - 1 if ref.loss_after > 0 else 0.0})
        return fast

    awq.search_scale, awq.search_clip = scale, clip
    try:
        calib, _ = split_text(model)
        quantfoundry.run(str(model_folder(model)), quantizer="awq", exporter="gguf",
                         exporter_options={"type": "Q4_K_M"}, evaluators=[], progress=False,
                         calibrator_options={"path": str(calib), "n_samples": 128, "seq_len": 512})
    finally:
        awq.search_scale, awq.search_clip = search_scale, search_clip
    return {"scale": scale_rows, "clip": clip_rows}


def summary(rows: dict) -> dict:
    s, c = rows["scale"], rows["clip"]
    ex_s = sorted(r["excess"] for r in s)
    ex_c = sorted(r["excess"] for r in c)
    return {"scale_searches": len(s), "scale_same": sum(r["same"] for r in s),
            "scale_excess_median": ex_s[len(ex_s) // 2], "scale_excess_max": ex_s[-1],
            "clip_searches": len(c), "clip_units": sum(r["units"] for r in c),
            "clip_same_units": sum(r["same_units"] for r in c),
            "clip_excess_median": ex_c[len(ex_c) // 2], "clip_excess_max": ex_c[-1]}


def table(data: dict) -> str:
    lines = ["| model | scale searches | same α | objective excess at the default's α: median / max | "
             "clip units | same shrink | clip objective excess: median / max |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for model, row in data["rows"].items():
        m = row["summary"]
        lines.append(f"| {model} | {m['scale_searches']} | {m['scale_same']} | "
                     f"{m['scale_excess_median']:.2%} / {m['scale_excess_max']:.2%} | {m['clip_units']} | "
                     f"{m['clip_same_units'] / m['clip_units']:.1%} | "
                     f"{m['clip_excess_median']:.3%} / {m['clip_excess_max']:.3%} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["pycode-7m"])
    args = ap.parse_args()
    from _common import core_version, cpu_name

    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"rows": {}}
    for model in args.models:
        rows = measure(model)
        data["rows"][model] = {"summary": summary(rows), **rows}
        print(model, json.dumps(data["rows"][model]["summary"]), flush=True)
    data.update(machine=cpu_name(), **core_version())
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=1))
    print(table(data))


if __name__ == "__main__":
    main()

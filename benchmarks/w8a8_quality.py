"""Issue 19: W8A8 quality — int8 inputs per token (dynamic) or per tensor (static), naive (round to
nearest, no smoothing) against SmoothQuant (``--quantizer smoothquant --quantizer rtn``, α = 0.5,
its α search, the norm-only folds), against llm-compressor's ``SmoothQuantModifier`` +
``QuantizationModifier`` (W8A8) on the same calibration ids; FP8 W8A8 (dynamic and static); and
the activation outliers per layer before and after smoothing.

Protocol (as ``gptq_vs_peer.py``): calibration on the first 60 % of the in-domain text (128 × 512
tokens, qf's ``text`` calibrator, seed 0 — the same ids for the peer); ``kl`` against the original
on the held-out 40 % and on WikiText (``gptq_vs_peer.evaluate``). Every model, qf's and the
peer's, is measured the same way: its dequantized weights in the original architecture, each
quantized linear's input quantized as vLLM quantizes it (``quantfoundry.ActQuant``: per-token
``x · 127/max|x|``, or the stored static scale) — for the peer, its weights and static scales
read from its ``save_compressed=False`` model. Rows "+ fp8 kv" add the FP8 KV cache
(``--kv-cache fp8``: keys after RoPE and values in e4m3, one calibrated scale each per layer).

Outliers: per linear input, ``max_j max|X_j| / median_j max|X_j|`` over the calibration tokens,
before (the float model) and after SmoothQuant (the smoothed float model), the median over
the model's linears of each kind.

    python benchmarks/w8a8_quality.py [--models pycode-7m] [--peer-python /work/venvs/llmc/bin/python]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import quantfoundry as qf
import torch
from _common import parse_results_args, save_rows
from gptq_vs_peer import CACHE, HERE, calibration_ids, evaluate, peer_model, split_text
from quantfoundry.data import english_eval_text
from rtn_sweep import model_folder

RESULTS = HERE / "results" / "w8a8_quality.json"
SQ = ("smoothquant", {})
#: (scheme label, weight format, activation spec, recipe stages)
METHODS: dict[str, tuple[str, str, list[tuple[str, dict[str, Any]]]]] = {
    "int8 dyn|naive": ("int8-sym", "int8", [("rtn", {})]),
    "int8 dyn|smoothquant": ("int8-sym", "int8", [SQ, ("rtn", {})]),
    "int8 dyn|smoothquant norms": ("int8-sym", "int8", [("smoothquant", {"folds": "norms"}), ("rtn", {})]),
    "int8 dyn|smoothquant search": ("int8-sym", "int8", [("smoothquant", {"search": True}), ("rtn", {})]),
    "int8 dyn|smoothquant + gptq": ("int8-sym", "int8", [SQ, ("gptq", {})]),
    "int8 static|naive": ("int8-sym", "int8-static", [("rtn", {})]),
    "int8 static|smoothquant": ("int8-sym", "int8-static", [SQ, ("rtn", {})]),
    "int8 static|smoothquant search": ("int8-sym", "int8-static", [("smoothquant", {"search": True}), ("rtn", {})]),
    "fp8 dyn|naive": ("fp8-e4m3", "fp8", [("rtn", {})]),
    "fp8 static|naive": ("fp8-e4m3", "fp8-static", [("rtn", {})]),
    "weight-only int8|naive": ("int8-sym", "", [("rtn", {})]),
    "weight-only int8 + fp8 kv|naive": ("int8-sym", "", [("rtn", {})]),
    "fp8 dyn + fp8 kv|naive": ("fp8-e4m3", "fp8", [("rtn", {})]),
}
#: rows with the FP8 KV cache (``--kv-cache fp8``)
KV = {"weight-only int8 + fp8 kv|naive", "fp8 dyn + fp8 kv|naive"}
#: llm-compressor's SmoothQuantModifier (α = 0.5, its norm mappings) + W8A8
PEERS = {"int8 dyn|llm-compressor": ("int8", "dynamic"), "int8 static|llm-compressor": ("int8-static", "static")}


def simulate_inputs(model: torch.nn.Module, acts: dict[str, qf.ActQuant], scales: dict[str, float]) -> None:
    """Pre-hooks quantizing each named linear's input as the engine does."""
    for name, act in acts.items():
        scale = torch.tensor([scales[name]]) if name in scales else None

        def hook(_m, args, act=act, scale=scale):
            return (act.fake_quant(args[0], None if scale is None else scale.to(args[0].device)), *args[1:])
        model.get_submodule(name).register_forward_pre_hook(hook)


def run_peer(model: str, ids: Path, peer_python: str, static: bool) -> tuple[dict[str, Any], torch.nn.Module]:
    out = CACHE / f"peer-smoothquant-{model}-{'static' if static else 'dynamic'}.safetensors"
    cmd = [peer_python, str(HERE / "peers" / "llmc_smoothquant.py"), "--model", str(model_folder(model)),
           "--calib-ids", str(ids), "--out", str(out), *(["--static"] if static else [])]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"peer failed: {r.stderr[-3000:]}")
    info = json.loads(out.with_suffix(".json").read_text())
    m = peer_model(model, out)
    act = qf.ActQuant("int8", dynamic=not static)
    simulate_inputs(m, {n: act for n in info["quantized_linears"]}, info.get("input_scales", {}))
    return info, m


def outliers(model_name: str, calib: Path) -> dict[str, Any]:
    """Median over linears of max/median channel absmax, per linear kind, before and after smoothing."""
    from quantfoundry.pipeline.components import make
    from quantfoundry.pipeline.stages import RunRequest, load_and_plan, resolve
    from quantfoundry.toolkit import BlockStream, collect_input_stats

    state = resolve(RunRequest(model=str(model_folder(model_name)), quantizer=[SQ, ("rtn", {})], format="int8-sym",
                               activations="int8", calibrator_options={"path": str(calib), "n_samples": 32,
                                                                       "seq_len": 512}, progress=False))
    load_and_plan(state)
    transform = state.transforms[0]
    ratios: dict[str, dict[str, list[float]]] = {}
    stream = BlockStream(state.source, calibration=state.calibration, batch_size=8, plan=state.plan)
    for block in stream:
        names = list(block.formats)
        for when in ("before", "after"):
            stats = collect_input_stats(block, names, want=("absmax",), share=False)
            for n in names:
                a = stats[n].absmax.float()
                ratios.setdefault(n.split(".")[-1], {}).setdefault(when, []).append(float(a.max() / a.median()))
            if when == "before":
                transform.transform_block(block, state.ctx)
    del make
    return {kind: {w: float(torch.tensor(v).median()) for w, v in d.items()} for kind, d in ratios.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["pycode-7m"])
    ap.add_argument("--methods", nargs="+", default=[*METHODS, *PEERS])
    ap.add_argument("--peer-python", default="/work/venvs/llmc/bin/python")
    ap.add_argument("--device", default="cpu")
    parsed = parse_results_args(ap, RESULTS, table)
    if parsed is None:
        return
    args, rows = parsed
    for model in args.models:
        calib, held = split_text(model)
        texts = {"python": held, "wikitext": english_eval_text()}
        if f"{model}|outliers" not in rows:
            rows[f"{model}|outliers"] = outliers(model, calib)
            save_rows(args.results, rows)
            print(model, "outliers", rows[f"{model}|outliers"], flush=True)
        for method in args.methods:
            key = f"{model}|{method}"
            if key in rows:
                continue
            row: dict[str, Any] = {}
            if method in METHODS:
                fmt, acts, stages = METHODS[method]
                r = qf.run(str(model_folder(model)), quantizer=stages, format=fmt, activations=acts or None,
                           kv_cache="fp8" if method in KV else None,
                           calibrator_options={"path": str(calib), "n_samples": 128, "seq_len": 512}, out=None,
                           keep_model=True, progress=False, device=args.device, evaluators=[])
                quantized = r.model
            else:
                if not Path(args.peer_python).exists():
                    print(f"{key}: no peer python at {args.peer_python} (benchmarks/peers/setup_llmc.sh)")
                    continue
                acts, how = PEERS[method]
                info, quantized = run_peer(model, calibration_ids(model, calib), args.peer_python, how == "static")
                row["peer"] = {k: info[k] for k in ("seconds", "settings", "versions") if k in info}
            for side, text in texts.items():
                row[side] = evaluate(model, quantized, text)
            rows[key] = row
            save_rows(args.results, rows)
            print(key, json.dumps({s: row[s]["kl_mean"] for s in texts}), flush=True)
    print(table(rows))


def table(rows: dict[str, Any]) -> str:
    lines = ["| model | scheme | method | KL Python (held out) | top-1 % | ppl (orig.) | KL WikiText | top-1 % |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for key, r in rows.items():
        if key.endswith("|outliers"):
            continue
        model, scheme, method = key.split("|")
        a, b = r["python"], r["wikitext"]
        lines.append(f"| {model} | {scheme} | {method} | {a['kl_mean']:.4f} | {a['same_top1_pct']:.2f} | "
                     f"{a['ppl_quantized']:.3f} ({a['ppl_original']:.3f}) | {b['kl_mean']:.4f} | "
                     f"{b['same_top1_pct']:.2f} |")
    lines += ["", "| model | linear | outlier ratio before | after SmoothQuant |", "|---|---|---:|---:|"]
    for key, r in rows.items():
        if key.endswith("|outliers"):
            for kind, v in r.items():
                lines.append(f"| {key.split('|')[0]} | {kind} | {v['before']:.1f} | {v['after']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

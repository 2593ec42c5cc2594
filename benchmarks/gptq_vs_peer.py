"""GPTQ (issue 6): quality and quantization wall time of qf's ``gptq`` vs RTN vs a peer GPTQ
(llm-compressor's ``GPTQModifier``), same model, same calibration ids, same settings.

For each model, its in-domain text is split at a line boundary: the first 60% calibrates
(128 windows × 512 tokens drawn by qf's ``text`` calibrator, seed 0; the very same ids are
handed to the peer), the last 40% evaluates (``kl``: mean KL and same-top-1 against the
original, and the perplexity of both on the same positions). Every quantized model — qf's
in memory, the peer's dequantized weights loaded into the original architecture — goes
through the same evaluator code, so the columns are comparable.

Wall time is the quantization only, side by side in one process tree on one machine: qf's
``run`` (model load + calibration capture + every block; no export, no evaluation) against the
peer's ``oneshot`` call (after its model load). The peer runs in its own virtualenv
(``--peer-python``; it pins transformers<=5.17) through ``benchmarks/peers/llmc_gptq.py``.

Act-order: llm-compressor (compressed-tensors 0.19) offers only ``actorder="static"`` —
desc_act with every group's grid fitted on the original weights before the loop — so the
act-order rows compare it with qf's ``desc_act=true static_groups=true`` (``gptq``), and add
qf's ``desc_act=true`` with groups fitted in the loop, stored with ``g_idx`` (``gptq-gidx``).
Without act-order llm-compressor still fits every group on the original weights; qf fits a
group when the loop reaches it (the reference GPTQ code's way).

    python benchmarks/gptq_vs_peer.py --models pycode-7m [--peer-python /work/venvs/llmc/bin/python]
    python benchmarks/gptq_vs_peer.py --table-only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import quantfoundry as qf
import torch
from _common import load_rows, save_rows
from quantfoundry import EvalTarget, QuantLinear, resolve_model
from quantfoundry.pipeline.evaluate import Evaluation, make_reference
from rtn_sweep import TEXTS, model_folder

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "gptq"
RESULTS = HERE / "results" / "gptq_vs_peer.json"
IN_DOMAIN = {"pycode-7m": "python", "smollm2-135m": "wikitext2"}
EVAL_TOKENS = {"pycode-7m": 50_000, "smollm2-135m": 16_384}
#: (format, act-order) per model; SmolLM2's 576-wide linears take no g128 in the peer: g64 there
CONFIGS = {
    "pycode-7m": [(f, False) for f in ("int4-g128", "int4-g128-sym", "int3-g128", "int3-g128-sym")]
    + [("int4-g128", True), ("int3-g128", True)],
    "smollm2-135m": [("int4-g64", False), ("int4-g64-sym", False), ("int3-g64", False), ("int4-g64", True),
                     ("int4-g128", False)],
}
#: rows the peer refuses (SmolLM2's 576 input columns are not a multiple of 128): qf and RTN only
PEER_REFUSES = {("smollm2-135m", "int4-g128")}


def split_text(model: str) -> tuple[Path, Path]:
    """``(calibration, evaluation)`` files: the in-domain text cut at 60% on a line boundary."""
    src = TEXTS[IN_DOMAIN[model]]
    text = src.read_text(encoding="utf-8")
    cut = text.index("\n", int(len(text) * 0.6)) + 1
    CACHE.mkdir(parents=True, exist_ok=True)
    calib, held = CACHE / f"{src.stem}.calib.txt", CACHE / f"{src.stem}.eval.txt"
    for path, part in ((calib, text[:cut]), (held, text[cut:])):
        if not path.exists() or path.read_text(encoding="utf-8") != part:
            path.write_text(part, encoding="utf-8")
    return calib, held


def calibration_ids(model: str, calib: Path) -> Path:
    """The 128 × 512 ids qf's text calibrator draws (seed 0), saved for the peer."""
    path = CACHE / f"{model}.calib-ids.pt"
    if not path.exists():
        source = resolve_model(str(model_folder(model)))
        cal = qf.get_component("calibrator", "text")(
            qf.get_component("calibrator", "text").Options(path=calib, n_samples=128, seq_len=512))
        torch.save(cal.load(source.tokenizer()).input_ids, path)
    return path


def evaluate(model_name: str, model: torch.nn.Module, held: Path, tokens: int | None = None) -> dict[str, Any]:
    """``kl`` of ``model`` against the original on the held-out text (reference cached), on its
    first ``tokens`` tokens (default: the model's ``EVAL_TOKENS``)."""
    source = resolve_model(str(model_folder(model_name)))
    tok = source.tokenizer()
    dev = next(model.parameters()).device
    ev = qf.get_component("evaluator", "kl")
    evaluation = Evaluation.of([ev(ev.Options(path=held, max_tokens=tokens or EVAL_TOKENS[model_name]))])
    reference = make_reference(source, tok, dev, cache=True, info={"progress": False})
    try:
        evaluation.measure(EvalTarget(model, tok, source, "quantized", dev, reference=reference), "quantized")
    finally:
        reference.release()
    m = evaluation.metrics["kl"]
    return {k: m[k]["quantized"] for k in ("kl_mean", "kl_p99", "same_top1_pct", "ppl_quantized", "ppl_original")}


def run_qf(model: str, fmt: str, act_order: bool, method: str, calib: Path, device: str) -> tuple[float, torch.nn.Module]:
    quantizer = "rtn" if method == "rtn" else "gptq"
    opts = {"desc_act": act_order, "static_groups": act_order and method == "gptq"} if quantizer == "gptq" else {}
    t0 = time.perf_counter()
    r = qf.run(str(model_folder(model)), quantizer=quantizer, quantizer_options=opts, format=fmt, out=None,
               calibrator_options={"path": str(calib), "n_samples": 128, "seq_len": 512} if quantizer == "gptq" else None,
               keep_model=True, progress=False, device=device)
    return time.perf_counter() - t0, r.model


def run_peer(model: str, fmt: str, ids: Path, peer_python: str, device: str, *,
             script: str = "llmc_gptq.py", args: tuple[str, ...] = (), tag: str = "gptq"
             ) -> tuple[dict[str, Any], torch.nn.Module]:
    """Run a peer script in its own venv; its saved weights loaded into the original architecture.

    The script writes ``OUT.safetensors`` (state-dict names: the quantized linears' dequantized
    weights, and — AWQ — every other tensor it changed, e.g. folded norms) and ``OUT.json``.
    """
    spec = qf.resolve_format(fmt).options
    out = CACHE / f"peer-{tag}-{model}-{fmt}{''.join(args).replace('--', '-')}.safetensors"
    cmd = [peer_python, str(HERE / "peers" / script), "--model", str(model_folder(model)),
           "--calib-ids", str(ids), "--bits", str(spec.bits), "--group-size", str(spec.group_size),
           "--sym" if spec.sym else "--asym", "--device", device, "--out", str(out), *args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"peer failed: {r.stderr[-3000:]}")
    info = json.loads(out.with_suffix(".json").read_text())
    return info, peer_model(model, out).to(device)


def peer_model(model: str, weights: Path) -> torch.nn.Module:
    """The original architecture of ``model`` (float32) holding the peer's saved tensors."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model_obj = AutoModelForCausalLM.from_pretrained(str(model_folder(model)), dtype=torch.float32).eval()
    result = model_obj.load_state_dict({k: v.float() for k, v in load_file(str(weights)).items()}, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"peer weights not in the model: {result.unexpected_keys[:5]}")
    return model_obj


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["pycode-7m"], choices=list(CONFIGS))
    ap.add_argument("--peer-python", default="/work/venvs/llmc/bin/python")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    rows: dict[str, Any] = load_rows(RESULTS)

    def save() -> None:
        save_rows(RESULTS, rows)

    if not args.table_only:
        for model in args.models:
            calib, held = split_text(model)
            ids = calibration_ids(model, calib)
            for fmt, act in CONFIGS[model]:
                # act-order: llm-compressor's (compressed-tensors 0.19) is desc_act with static groups;
                # qf runs that, and desc_act with groups fitted in the loop (stored with g_idx)
                variants = [("rtn", False)] if not act else [("gptq-gidx", True)]
                variants += [("gptq", act)]
                if not args.no_peer and (model, fmt) not in PEER_REFUSES:
                    variants.append(("llm-compressor", act))
                for method, a in variants:
                    key = f"{model}|{fmt}|{'act' if a else '-'}|{method}|{args.device}"
                    if key in rows:
                        continue
                    print(key, flush=True)
                    if method == "llm-compressor":
                        info, m = run_peer(model, fmt, ids, args.peer_python, args.device,
                                           args=("--act-order",) if a else ())
                        seconds, extra = info["seconds"], {"peer": info.get("versions")}
                    else:
                        seconds, m = run_qf(model, fmt, a, method, calib, args.device)
                        extra = {"formats": sorted({q.format.spec for q in m.modules() if isinstance(q, QuantLinear)})}
                    rows[key] = {"seconds": seconds, **evaluate(model, m, held), **extra}
                    del m
                    save()
    print(table(rows))


def table(rows: dict[str, Any]) -> str:
    lines = ["| model | format | act-order | method | KL mean | same top-1 % | ppl (orig) | quant. time s | time vs peer |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for key, r in sorted(rows.items()):
        model, fmt, act, method, dev = key.split("|")
        peer = rows.get(f"{model}|{fmt}|{act}|llm-compressor|{dev}")
        ratio = f"{r['seconds'] / peer['seconds']:.2f}×" if peer and method.startswith("gptq") else ""
        lines.append(f"| {model} | {fmt} | {act} | {method} | {r['kl_mean']:.4f} | {r['same_top1_pct']:.2f} | "
                     f"{r['ppl_quantized']:.4f} ({r['ppl_original']:.4f}) | {r['seconds']:.1f} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

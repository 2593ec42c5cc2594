"""Issue 23: how much of post-training quantization's loss QAT (``qat``) wins back, from RTN and
from GPTQ starts, onto int grids and GGUF K-quant mixes — and torchao's QAT beside it.

Protocol (one model, default pycode-7m): training and calibration ids are ``N × T`` tokens
drawn by qf's ``text`` calibrator (seed 0; default 512 × 256; 200 steps of 4 sequences) from the
CPython sample of ``../shared/data/python-code`` without its first 189,189 bytes — which are
``python_eval.txt``, so the training text (1.24 MB, about 370k tokens, ``python_calib.txt``'s
modules among them) is disjoint from the evaluation text; the last 10% of the sequences are the
training's held-out split (it keeps the best of the states measured every 50 steps). Every model
is scored by QuantFoundry's ``kl`` evaluator against the original on
``python_eval.txt`` (in domain, disjoint from the training text) and ``english_eval.txt``
(WikiText, out of domain), 16,384 tokens each: KL, same top-1, perplexity. Recovery =
(PTQ − QAT) / (PTQ − original) of the KL (the original's is 0) and of the perplexity, where PTQ
is the row QAT started from (``rtn`` or ``gptq`` on the same grid).

torchao 0.18's QAT (``benchmarks/peers/torchao_qat.py``, its own virtualenv) trains on the same
ids with the same loop (loss, order, AdamW, schedule, held-out rule — a copy of
``quantfoundry.toolkit.distill``): on the symmetric grids its ``IntxWeightOnlyConfig`` grid
(scales recomputed from min/max in every step; what its ``convert`` deploys), on the asymmetric
ones its min/max float-zero-point grid (tinygemm's; the nearest to ours it has). Its untrained
start (``torchao rtn``) is the same script with one step at a vanishing learning rate (the
held-out rule keeps the start). Both QATs train float32 weights (``autocast=off``) at the same
peak learning rate (``--lr``/``--peer-lr``, 1e-4; 10 steps of warm-up, then cosine); ``qat<-rtn
lsq`` also learns the grid (``learn_grid``), ``qat<-rtn lora`` trains rank-16 adapters at ten
times the rate instead of the weights; ``--steps 600`` rows say so.

    python benchmarks/qat_quality.py [--device cuda] [--grids int3-g128 ...] [--methods rtn qat<-rtn ...]
    python benchmarks/qat_quality.py --sweep        # learning rates and qat's start, on int3-g128-sym
    python benchmarks/qat_quality.py --table-only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import gptq_vs_peer
import quantfoundry as qf
import torch
from _common import load_rows, save_rows
from quantfoundry import resolve_model
from quantfoundry.data import default_eval_text, english_eval_text
from rtn_sweep import model_folder

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "qat_quality.json"
CACHE = HERE / ".cache" / "qat"
GRIDS = ("int4-g128", "int3-g128", "int2-g64", "int4-g128-sym", "int3-g128-sym", "int2-g64-sym", "Q3_K_M", "Q2_K")
METHODS = ("rtn", "gptq", "qat<-rtn", "qat<-gptq", "qat<-rtn lsq", "qat<-rtn lora", "qat<-rtn grid", "torchao rtn",
           "torchao qat")
STEPS = 200
TEXTS = {"python": default_eval_text(), "wikitext": english_eval_text()}
SAMPLE = HERE.parent.parent / "shared" / "data" / "python-code" / "cpython311_stdlib_sample.py"


def training_text() -> Path:
    """The CPython sample without its prefix ``python_eval.txt`` (checked to be one)."""
    path = CACHE / "python-train.txt"
    if not SAMPLE.exists() and path.exists():  # a machine without ../shared, the text carried to it
        return path
    sample, held = SAMPLE.read_text(encoding="utf-8"), default_eval_text().read_text(encoding="utf-8")
    if not sample.startswith(held):
        raise SystemExit(f"{default_eval_text()} is not a prefix of {SAMPLE}: the training text would overlap it")
    if not path.exists() or path.read_text(encoding="utf-8") != sample[len(held):]:
        CACHE.mkdir(parents=True, exist_ok=True)
        path.write_text(sample[len(held):], encoding="utf-8")
    return path


def is_gguf(grid: str) -> bool:
    return grid.startswith("Q")


def applies(grid: str, method: str) -> bool:
    if method.endswith("grid"):
        return False  # the learning-rate sweep's
    if method.startswith("torchao") or method.endswith(("lsq", "lora")):
        return not is_gguf(grid)  # int grids only (LSQ: the grids that take learned steps back)
    if "gptq" in method:
        return not grid.endswith("-sym")  # the GPTQ start on the asymmetric grids and the GGUF mixes
    return True


def evaluate(model_name: str, model: torch.nn.Module, tokens: int) -> dict[str, Any]:
    """QuantFoundry's ``kl`` evaluator on both texts, against the original (reference cached)."""
    return {side: gptq_vs_peer.evaluate(model_name, model, path, tokens) for side, path in TEXTS.items()}


def train_ids(model: str, n: int, t: int) -> Path:
    """The ids qf's text calibrator draws (what ``qat`` trains on), saved for the peer."""
    path = CACHE / f"{model}-train-{n}x{t}.pt"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        cal = qf.get_component("calibrator", "text")
        ids = cal(cal.Options(path=training_text(), n_samples=n, seq_len=t)).load(
            resolve_model(str(model_folder(model))).tokenizer()).input_ids
        torch.save(ids, path)
    return path


def run_qf(args: argparse.Namespace, grid: str, method: str, lr: float) -> tuple[dict[str, Any], torch.nn.Module]:
    start = method.split("<-")[-1].split()[0]
    if method.startswith("qat"):
        lora = 16 if method.endswith("lora") else 0  # adapters of rank 16 at ten times the weights' rate
        lr = lr * 10 if lora else lr
        quantizer = [("qat", {"init": start, "steps": args.steps, "lr": lr, "lora_rank": lora, "batch": args.batch,
                              "warmup": 10,
                              "eval_every": 50, "learn_grid": method.endswith("lsq"), "autocast": "off",
                              "start": "grid" if method.endswith("grid") else "original",
                              "grad_checkpointing": "off"})]
    else:
        quantizer = [(start, {})]
    where: dict[str, Any] = ({"exporter": "gguf", "exporter_options": {"type": grid}} if is_gguf(grid)
                             else {"format": grid})
    t0 = time.perf_counter()
    r = qf.run(str(model_folder(args.model)), quantizer=quantizer, out=None, keep_model=True, progress=False,
               evaluators=[], device=args.device,
               calibrator_options={"path": str(training_text()), "n_samples": args.n, "seq_len": args.t},
               **where)
    row: dict[str, Any] = {"seconds": round(time.perf_counter() - t0, 1), "device": args.device}
    if method.startswith("qat"):
        row.update(lr=lr, steps=args.steps, batch=args.batch, seq_len=args.t, sequences=args.n,
                   tokens_trained=args.steps * args.batch * args.t, train_s=round(r.timings.get("refine", 0.0), 1),
                   note=next(n for n in r.notes if n.startswith("qat:")))
    return row, r.model


def run_torchao(args: argparse.Namespace, grid: str, method: str, lr: float) -> tuple[dict[str, Any], torch.nn.Module]:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    fmt = qf.resolve_format(grid).options
    trained = method == "torchao qat"
    out = CACHE / f"torchao-{args.model}-{grid}-{'qat' if trained else 'rtn'}-{lr:g}.safetensors"
    cmd = [args.peer_python, str(HERE / "peers" / "torchao_qat.py"), "--model", str(model_folder(args.model)),
           "--train-ids", str(train_ids(args.model, args.n, args.t)), "--bits", str(fmt.bits),
           "--group-size", str(fmt.group_size), "--mapping", "sym" if fmt.sym else "asym",
           "--steps", str(args.steps if trained else 1), "--lr", str(lr if trained else 1e-30),
           "--warmup", "10" if trained else "0", "--batch", str(args.batch),
           "--eval-every", "50", "--threads", str(torch.get_num_threads()), "--device", args.device, "--out", str(out)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    record = json.loads(out.with_suffix(".json").read_text())
    model = AutoModelForCausalLM.from_pretrained(str(model_folder(args.model)), dtype=torch.float32)
    model.load_state_dict(load_file(str(out)), strict=False)
    row: dict[str, Any] = {"seconds": round(time.perf_counter() - t0, 1), "device": args.device,
                           "torchao": record["versions"]["torchao"], "fake_quant": record["settings"]["fake_quant"]}
    if trained:
        row.update(lr=lr, steps=args.steps, batch=args.batch, seq_len=args.t, sequences=args.n,
                   tokens_trained=record["tokens_trained"], train_s=record["seconds_train"],
                   note=f"held-out KL {record['held_before']:.4g} -> {record['held_best']:.4g} "
                        f"(best at step {record['best_step']})")
    return row, model.to(args.device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="pycode-7m")
    ap.add_argument("--grids", nargs="+", default=list(GRIDS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=512, help="training sequences")
    ap.add_argument("--t", type=int, default=256, help="tokens per sequence")
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4, help="qat's peak learning rate")
    ap.add_argument("--peer-lr", type=float, default=1e-4, help="torchao's peak learning rate")
    ap.add_argument("--sweep", action="store_true", help="qat and torchao at three learning rates on int3-g128-sym")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--peer-python", default="/work/venvs/torchao/bin/python")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    rows = load_rows(args.results)
    if not args.table_only:
        plan = [(g, m, args.peer_lr if m.startswith("torchao") else args.lr)
                for g in args.grids for m in args.methods if applies(g, m)]
        if args.sweep:
            plan = [("int3-g128-sym", "rtn", 0.0), ("int3-g128-sym", "torchao rtn", 0.0)] + [
                ("int3-g128-sym", m, lr) for m in ("qat<-rtn", "qat<-rtn grid", "torchao qat")
                for lr in (1e-4, 3e-4, 1e-3, 3e-3)]
        for grid, method, lr in plan:
            key = f"{args.model}|{grid}|{method}" + (f"|lr {lr:g}" if args.sweep and lr else "")
            if args.steps != STEPS and method.startswith(("qat", "torchao qat")):
                key += f"|{args.steps} steps"
            if key in rows:
                continue
            runner = run_torchao if method.startswith("torchao") else run_qf
            row, model = runner(args, grid, method, lr)
            row.update(evaluate(args.model, model, args.eval_tokens))
            rows[key] = row
            save_rows(args.results, rows)
            print(key, json.dumps(row), flush=True)
            del model
    print(table(rows))


START = {"qat<-rtn": "rtn", "qat<-rtn grid": "rtn", "qat<-rtn lora": "rtn", "qat<-gptq": "gptq", "qat<-rtn lsq": "rtn",
         "torchao qat": "torchao rtn"}


def table(rows: dict[str, Any]) -> str:
    lines = ["| model | grid | method | KL Python | top-1 % | ppl (orig.) | recovery KL / ppl | KL WikiText | "
             "recovery KL / ppl | trained (s) |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key, r in rows.items():
        model, grid, method, *extra = key.split("|")
        start = rows.get(f"{model}|{grid}|{START[method]}") if method in START else None
        cells = []
        for side in TEXTS:
            a = r[side]
            if start is None:
                cells.append("")
                continue
            s = start[side]
            kl = (s["kl_mean"] - a["kl_mean"]) / s["kl_mean"]
            gap = s["ppl_quantized"] - s["ppl_original"]
            # a start within 2% of the original's perplexity leaves a ratio of noise
            ppl = (s["ppl_quantized"] - a["ppl_quantized"]) / gap if gap > 0.02 * s["ppl_original"] else None
            cells.append(f"{100 * kl:.0f}% / " + ("—" if ppl is None else f"{100 * ppl:.0f}%"))
        a, b = r["python"], r["wikitext"]
        label = method + (f" ({', '.join(extra)})" if extra else "")
        trained = f"{r['train_s']:.0f} ({r['tokens_trained'] // 1000}k tok)" if "train_s" in r else ""
        lines.append(f"| {model} | {grid} | {label} | {a['kl_mean']:.4f} | {a['same_top1_pct']:.2f} | "
                     f"{a['ppl_quantized']:.3f} ({a['ppl_original']:.3f}) | {cells[0]} | {b['kl_mean']:.4f} | "
                     f"{cells[1]} | {trained} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

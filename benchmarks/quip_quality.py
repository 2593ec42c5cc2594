"""Issue 22: QuIP# at about 2 bits per weight against GPTQ int2 and llama.cpp's 2-bit types, one
evaluator for all.

On one model (default pycode-7m) with ``gptq_gguf.py``'s split of its in-domain text (the first
60% calibrates, the held-out 40% is scored):

* qf: ``quip`` onto ``e8p`` (randomized Hadamard incoherence + BlockLDLQ), ``quip`` without
  incoherence (BlockLDLQ alone), ``e8p`` rounded to nearest, ``gptq`` onto ``int2-g64``,
  ``quip`` onto the 3- and 4-bit ``e8p-rvq3`` and ``e8p-rvq4``, and ``quip`` with its per-block
  fine-tuning onto ``e8p`` and ``e8p-rvq3`` (``--finetune-epochs``, ``--finetune-lr``), and onto
  ``e8p`` with its end-to-end pass after it (``--e2e-epochs``, ``--e2e-lr``) —
  each ``qf run`` calibrated on 128 × 512 tokens of the calibration part (the text calibrator,
  seed 0), written as the qf artifact and reloaded;
* llama.cpp: ``IQ2_XXS``, ``IQ2_XS``, ``Q2_K``, ``IQ3_XXS`` and ``Q4_K_S`` from ``llama-quantize`` with the imatrix
  ``llama-imatrix`` made on the same calibration part (``gptq_gguf.prepare_base``), loaded back
  into a torch model through transformers' GGUF reader (gguf-py's dequantization).

Every model is scored by QuantFoundry's KL evaluator against the original (float32), on the
held-out text (windows of 512, the exact full-vocabulary KL, its top-1 agreement and both
perplexities), so the comparison is one measurement. Bits per weight count the decoder blocks'
linear weights: for qf the size evaluator's ``linear_bpw`` (codes, grid parameters, sign bits or the fine-tuned float16 vectors),
for GGUF the stored bytes of the ``blk.*`` matrices. llama.cpp's own KLD of each GGUF file
(``llama-perplexity --kl-divergence`` against its F16 conversion) is reported beside it.

    python benchmarks/quip_quality.py [--model pycode-7m] [--max-tokens 40000]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import quantfoundry as qf
import torch
from _common import core_version, cpu_name
from gguf_vs_llama_quantize import KLD_LINES, llama_cpp, run_cmd
from gptq_gguf import CHUNKS, PPL_ARGS, THREADS, WORK, parse_retrying, prepare_base
from gptq_vs_peer import split_text
from rtn_sweep import model_folder

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "quip_quality.json"
QF_METHODS = {
    "qf quip e8p": ("quip", {}, "e8p"),
    "qf quip e8p, no incoherence": ("quip", {"incoherence": False}, "e8p"),
    "qf rtn e8p": ("rtn", {}, "e8p"),
    "qf gptq int2-g64": ("gptq", {}, "int2-g64"),
    "qf quip e8p-rvq3": ("quip", {}, "e8p-rvq3"),
    "qf quip e8p-rvq4": ("quip", {}, "e8p-rvq4"),
}
#: QuIP#'s fine-tuning (per block: the transforms' vectors and the norms; epochs set by
#: --finetune-epochs), and with its end-to-end pass after it (--e2e-epochs): (format, end to end)
FINETUNED = {"qf quip e8p, fine-tuned": ("e8p", False), "qf quip e8p-rvq3, fine-tuned": ("e8p-rvq3", False),
             "qf quip e8p, fine-tuned + end to end": ("e8p", True)}
GGUF_TYPES = ("IQ2_XXS", "IQ2_XS", "Q2_K", "IQ3_XXS", "Q4_K_S")


def kl_of(model: torch.nn.Module, folder: Path, held: Path, max_tokens: int) -> dict[str, float]:
    """QuantFoundry's KL evaluator: ``model`` against the original at ``folder`` on ``held``."""
    from quantfoundry import EvalTarget, resolve_model
    from quantfoundry.builtin.kl import KLEvaluator, KLOptions
    from quantfoundry.evaluation.reference import Reference

    cpu = torch.device("cpu")
    source = resolve_model(str(folder))
    ref = Reference(source, source.tokenizer(), cpu, cache=HERE / ".cache" / "quip-quality" / "reference")
    target = EvalTarget(model.eval(), source.tokenizer(), source, "quantized", cpu, reference=ref)
    opts = KLOptions(path=held, ctx=512, max_tokens=max_tokens, top_k=0)
    return {k: float(v) for k, v in KLEvaluator(opts).evaluate(target).items() if isinstance(v, int | float)}


def gguf_linear_bpw(path: Path) -> float:
    from gguf import GGUFReader

    bits = weights = 0
    for t in GGUFReader(str(path)).tensors:
        if t.name.startswith("blk.") and t.name.endswith(".weight") and len(t.shape) == 2:
            bits += 8 * int(t.n_bytes)
            weights += int(t.n_elements)
    return bits / weights


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="pycode-7m")
    ap.add_argument("--max-tokens", type=int, default=40_000, help="held-out tokens scored")
    ap.add_argument("--only", nargs="*", default=None, help="methods to run (default: all)")
    ap.add_argument("--finetune-epochs", type=int, default=5)
    ap.add_argument("--finetune-lr", type=float, default=1e-3)
    ap.add_argument("--e2e-epochs", type=int, default=3)
    ap.add_argument("--e2e-lr", type=float, default=1e-4)
    args = ap.parse_args()
    methods = dict(QF_METHODS)
    ft = {"finetune_epochs": args.finetune_epochs, "finetune_lr": args.finetune_lr}
    e2e = {**ft, "finetune_e2e_epochs": args.e2e_epochs, "finetune_e2e_lr": args.e2e_lr}
    methods.update({label: ("quip", e2e if end else ft, spec) for label, (spec, end) in FINETUNED.items()})
    folder = model_folder(args.model)
    calib, held = split_text(args.model)
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"rows": {}}
    rows = data["rows"]
    work = WORK.parent / "quip-quality" / args.model
    work.mkdir(parents=True, exist_ok=True)
    cal = {"path": str(calib), "n_samples": 128, "seq_len": 512}
    for label, (quantizer, opts, spec) in methods.items():
        if args.only is not None and label not in args.only:
            continue
        out = work / label.replace(" ", "-").replace(",", "")
        t0 = time.perf_counter()
        r = qf.run(str(folder), quantizer=[(quantizer, opts)], format=spec, out=str(out), overwrite=True,
                   evaluators=["size"], calibrator_options=cal if quantizer != "rtn" else {}, progress=False)
        seconds = time.perf_counter() - t0
        row = {"bpw": r.metrics["size"]["linear_bpw"]["quantized"], "quantize_s": r.timings.get("quantize", 0.0),
               **({"refine_s": r.timings["refine"]} if "refine" in r.timings else {}),
               "run_s": seconds, **({"finetune": opts} if opts in (ft, e2e) else {})}
        row.update(kl_of(qf.load(str(out)), folder, held, args.max_tokens))
        rows[f"{args.model}|{label}"] = row
        print(label, json.dumps(row), flush=True)
        RESULTS.write_text(json.dumps(data, indent=1))
    bin_dir, _ = llama_cpp()
    base, imat, kld_base = prepare_base(args.model)
    for ftype in GGUF_TYPES:
        label = f"llama.cpp {ftype} imatrix"
        if args.only is not None and label not in args.only:
            continue
        out = work / f"{ftype}.gguf"
        t0 = time.perf_counter()
        run_cmd([bin_dir / "llama-quantize", "--imatrix", imat, base, out, ftype, str(THREADS)])
        seconds = time.perf_counter() - t0
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(out.parent), gguf_file=out.name, dtype=torch.float32)
        row = {"bpw": gguf_linear_bpw(out), "quantize_s": seconds}
        row.update(kl_of(model, folder, held, args.max_tokens))
        row.update({f"llama.cpp {k}": v for k, v in parse_retrying(
            [bin_dir / "llama-perplexity", "-m", out, "--kl-divergence-base", kld_base, "--kl-divergence",
             *PPL_ARGS], KLD_LINES).items()})
        rows[f"{args.model}|{label}"] = row
        print(label, json.dumps(row), flush=True)
        RESULTS.write_text(json.dumps(data, indent=1))
    data.update(machine=cpu_name(), threads=THREADS, chunks=CHUNKS, **core_version())
    RESULTS.write_text(json.dumps(data, indent=1))
    print(table(data))


def table(data: dict) -> str:
    lines = ["| model | method | bits/weight | KL mean | same top-1 % | ppl quantized | ppl original | llama.cpp KLD |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for key, r in sorted(data["rows"].items(), key=lambda kv: (kv[0].split("|")[0], kv[1]["bpw"])):
        model, label = key.split("|")
        lk = r.get("llama.cpp kld_mean")
        lines.append(f"| {model} | {label} | {r['bpw']:.3f} | {r.get('kl_mean', float('nan')):.4f} | "
                     f"{r.get('same_top1_pct', float('nan')):.1f} | {r.get('ppl_quantized', float('nan')):.3f} | "
                     f"{r.get('ppl_original', float('nan')):.3f} | {'—' if lk is None else f'{lk:.4f}'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

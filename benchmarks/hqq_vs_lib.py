"""Issue 18: qf's ``hqq`` against the hqq library's own (``hqq.core.quantize.Quantizer``,
``optimize=True``, float zero points) at the same settings, side by side in one process: every
decoder-block linear quantized by each, the dequantized weights loaded into the original
architecture, ``kl`` against the original on the held-out Python text and on WikiText
(``gptq_vs_peer.evaluate``), and the quantization time of each (the sum over the linears,
measured the same way, after one untimed warm-up call). Round-to-nearest on the same grid is the
baseline.

The hqq library comes with ``third_party_plugins/qf-hqq-lib`` (hqq 0.2.8.post1)::

    python benchmarks/hqq_vs_lib.py [--models pycode-7m] [--device cpu]
    python benchmarks/hqq_vs_lib.py --retime 3      # times only (idle machine)
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import quantfoundry as qf
import torch
from _common import kl_pair_table, parse_results_args, save_rows
from gptq_vs_peer import evaluate
from quantfoundry.data import default_eval_text, english_eval_text
from rtn_sweep import model_folder

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "hqq_vs_lib.json"
SETTINGS = ((4, 64), (3, 64), (2, 64), (4, 128))


def quantize_all(model: torch.nn.Module, names: list[str], fn) -> tuple[torch.nn.Module, float]:
    """A copy of ``model`` whose linears ``names`` hold ``fn(weight)``, and the summed time of ``fn``."""
    out = copy.deepcopy(model)
    fn(out.get_submodule(names[0]).weight.data.float())  # warm-up: first-call set-up is not timed
    total = 0.0
    for name in names:
        lin = out.get_submodule(name)
        w = lin.weight.data.float()
        if w.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        deq = fn(w)
        if w.is_cuda:
            torch.cuda.synchronize()
        total += time.perf_counter() - t0
        lin.weight.data = deq.to(lin.weight.dtype)
    return out, total


def main() -> None:
    from hqq.core.quantize import Quantizer  # the library (its own venv)
    from qf_hqq import HQQQuantizer
    from transformers import AutoModelForCausalLM

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["pycode-7m"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--retime", type=int, default=0, metavar="N",
                    help="only re-measure the quantization times of existing rows: the median of N runs")
    parsed = parse_results_args(ap, RESULTS, table)
    if parsed is None:
        return
    args, rows = parsed
    dev = torch.device(args.device)
    ours = HQQQuantizer()
    ctx = qf.QuantContext(device=dev)
    for model_name, (bits, group) in itertools.product(args.models, SETTINGS):
        folder = model_folder(model_name)
        source = qf.resolve_model(str(folder))
        names = [n for n in source.linear_shapes() if source.is_block_linear(n)]
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(dev).eval()
        fmt = qf.resolve_format(f"int{bits}-g{group}-zf16")
        if any(fmt.check_shape(tuple(source.linear_shapes()[n])) for n in names):
            continue  # e.g. SmolLM2's 576 columns hold no groups of 128

        def lib(w: torch.Tensor, bits: int = bits, group: int = group) -> torch.Tensor:
            wq, meta = Quantizer.quantize(w, nbits=bits, channel_wise=True, group_size=group, optimize=True,
                                          round_zero=False, axis=1, compute_dtype=torch.float32, device=args.device)
            return Quantizer.dequantize(wq, meta).float().reshape(w.shape)

        methods = {"rtn": lambda w, fmt=fmt: fmt.quantize(w).dequantize(),
                   "qf hqq": lambda w, fmt=fmt: ours.quantize_tensor("w", w, fmt, ctx).dequantize(),
                   "hqq library": lib}
        for method, fn in methods.items():
            key = f"{model_name}|int{bits}-g{group}|{method}"
            if args.retime and key in rows:
                times = sorted(quantize_all(model, names, fn)[1] for _ in range(args.retime))
                rows[key]["seconds"] = round(times[len(times) // 2], 3)
                save_rows(args.results, rows)
                print(key, rows[key]["seconds"], flush=True)
                continue
            if key in rows:
                continue
            quantized, seconds = quantize_all(model, names, fn)
            row: dict[str, Any] = {"seconds": round(seconds, 3), "device": args.device}
            for side, text in (("python", default_eval_text()), ("wikitext", english_eval_text())):
                row[side] = evaluate(model_name, quantized, text)
            rows[key] = row
            save_rows(args.results, rows)
            print(key, json.dumps({k: row[k] for k in ("seconds",)}), row["python"]["kl_mean"], flush=True)
    print(table(rows))


def table(rows: dict[str, Any]) -> str:
    return kl_pair_table(rows, "quantization s", 2)


if __name__ == "__main__":
    sys.exit(main())

"""Issue 20, end to end: greedy decode tokens/s of config-built Llama models (random weights,
bfloat16) with every linear of the decoder blocks in int4-g128 — through ``triton-w4a16``,
through ``torch-int4`` (tinygemm; its grid, ``int4-g128-sym-sbf16``) — and in QuIP#'s ``e8p``
with its transforms (the kernels the dispatch picks: ``triton-e8p`` for one token, the reference
kernel above) — against the float model (cuBLAS), at batch 1 and 16, side by side in one process.

A decode step (one token per sequence, a static KV cache) is captured once in a CUDA graph and
replayed (``quantfoundry.evaluation.decode``, as the ``speed`` evaluator does on CUDA), so the
figure is the kernels' time, not Python's launch overhead; where capture fails the step runs
eagerly over the static cache and the row says so.

    python benchmarks/decode_speed.py --out benchmarks/results/cuda/decode_speed_h100.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import quantfoundry as qf
import torch
from quantfoundry.evaluation.decode import time_decode
from quantfoundry.toolkit import swap_in
from transformers import LlamaConfig, LlamaForCausalLM

MODELS = {
    "llama-1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, head_dim=64),
    "llama-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, head_dim=128),
}
VARIANTS = {"bf16 (cuBLAS)": (None, None), "int4-g128 triton-w4a16": ("int4-g128", "triton-w4a16"),
            "int4-g128-sym-sbf16 torch-int4": ("int4-g128-sym-sbf16", "torch-int4"),
            "e8p (QuIP#) dispatch": ("e8p", None)}


def quantize_blocks(model: torch.nn.Module, spec: str, kernel_name: str | None) -> None:
    """Every decoder-block linear onto ``spec`` through ``kernel_name`` — or, without one, through
    the kernels the dispatch picks per call (``select_kernels``); ``e8p`` gets random codes with
    randomized Hadamard transforms (QuIP#'s layout; speed does not depend on the values, and
    rounding 7 billion weights to the lattice is not what is measured)."""
    from e8p_speed import random_weight
    from quantfoundry.toolkit import select_kernels

    fmt = qf.resolve_format(spec)
    if kernel_name is None:
        kernel = select_kernels(fmt, next(model.parameters()).device)
    else:
        kernel = qf.get_component("kernel", kernel_name)(qf.get_component("kernel", kernel_name).Options())
    for name, mod in list(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            w = mod.weight.data
            qw = (random_weight(spec, *w.shape, w.device, transforms=True) if fmt.name == "e8p"
                  else fmt.quantize(w))
            swap_in(model, name, qw, kernel)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    args = ap.parse_args()
    dev = torch.device("cuda")
    rows: dict[str, Any] = {}
    for mname in args.models:
        for label in args.variants:
            spec, kernel = VARIANTS[label]
            torch.manual_seed(0)
            cfg = LlamaConfig(**MODELS[mname], max_position_embeddings=4096, torch_dtype="bfloat16")
            with torch.device(dev):
                model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
            if spec is not None:
                quantize_blocks(model, spec, kernel)
            for batch in args.batches:
                for m in model.modules():  # the kernels of this batch size alone
                    getattr(m, "kernels_used", set()).clear()
                prompt = torch.randint(0, cfg.vocab_size, (batch, 128), device=dev)
                t = time_decode(model, prompt, args.steps, mode="graph", repeats=5, warmup=1)
                rows[f"{mname}|{label}|b{batch}"] = {"tok_s": t.tokens_per_s, "how": t.mode}
                if spec is not None and kernel is None:  # which kernels the dispatch ran
                    rows[f"{mname}|{label}|b{batch}"]["kernels"] = sorted(
                        {n for m in model.modules() for n in getattr(m, "kernels_used", ())})
                print(mname, label, f"batch {batch}: {t.tokens_per_s:.1f} tok/s ({t.mode})", flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                                "rows": rows}, indent=1))
            del model
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

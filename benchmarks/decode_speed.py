"""Issue 20, end to end: greedy decode tokens/s of config-built Llama models (random weights,
bfloat16) with every linear of the decoder blocks in int4-g128 — through ``triton-w4a16``,
through ``torch-int4`` (tinygemm; its grid, ``int4-g128-sym-sbf16``) — against the float model
(cuBLAS), at batch 1 and 16, side by side in one process.

A decode step (one token per sequence, a static KV cache) is captured once in a CUDA graph and
replayed, so the figure is the kernels' time, not Python's launch overhead; where capture fails
the step runs eagerly and the row says so.

    python benchmarks/decode_speed.py --out benchmarks/results/cuda/decode_speed_h100.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import quantfoundry as qf
import torch
from quantfoundry.toolkit import swap_in
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

MODELS = {
    "llama-1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, head_dim=64),
    "llama-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, head_dim=128),
}
VARIANTS = {"bf16 (cuBLAS)": (None, None), "int4-g128 triton-w4a16": ("int4-g128", "triton-w4a16"),
            "int4-g128-sym-sbf16 torch-int4": ("int4-g128-sym-sbf16", "torch-int4")}


def quantize_blocks(model: torch.nn.Module, spec: str, kernel_name: str) -> None:
    fmt = qf.resolve_format(spec)
    kernel = qf.get_component("kernel", kernel_name)(qf.get_component("kernel", kernel_name).Options())
    for name, mod in list(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            swap_in(model, name, fmt.quantize(mod.weight.data), kernel)


@torch.no_grad()
def decode_tok_s(model: torch.nn.Module, batch: int, prompt: int, steps: int, dev: torch.device) -> tuple[float, str]:
    cfg = model.config
    cache = StaticCache(config=cfg, max_cache_len=prompt + steps + 16)
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt), device=dev)
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, cache_position=torch.arange(prompt, device=dev))
    tok = out.logits[:, -1:].argmax(-1)
    pos = torch.tensor([prompt], device=dev)

    def step() -> torch.Tensor:
        return model(input_ids=tok, past_key_values=cache, use_cache=True, cache_position=pos).logits

    how = "cuda graph"
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = step()
        run = graph.replay
    except Exception as e:  # noqa: BLE001 - report, then time eagerly
        how = f"eager ({type(e).__name__}: {str(e)[:120]})"
        torch.cuda.synchronize()

        def run() -> None:
            nonlocal logits
            logits = step()
        logits = step()
    times = []
    for _ in range(5):
        pos.fill_(prompt)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(steps):
            run()
            tok.copy_(logits[:, -1:].argmax(-1))
            pos.add_(1)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return batch * steps / statistics.median(times), how


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args()
    dev = torch.device("cuda")
    rows: dict[str, Any] = {}
    for mname in args.models:
        for label, (spec, kernel) in VARIANTS.items():
            torch.manual_seed(0)
            cfg = LlamaConfig(**MODELS[mname], max_position_embeddings=4096, torch_dtype="bfloat16")
            with torch.device(dev):
                model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
            if spec is not None:
                quantize_blocks(model, spec, kernel)
            for batch in args.batches:
                tps, how = decode_tok_s(model, batch, 128, args.steps, dev)
                rows[f"{mname}|{label}|b{batch}"] = {"tok_s": tps, "how": how}
                print(mname, label, f"batch {batch}: {tps:.1f} tok/s ({how})", flush=True)
            del model
            torch.cuda.empty_cache()
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

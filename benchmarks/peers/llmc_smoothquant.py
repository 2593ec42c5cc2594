"""Peer SmoothQuant runner: llm-compressor's ``SmoothQuantModifier`` + ``QuantizationModifier``
(W8A8: int8 per-channel symmetric weights, int8 symmetric inputs per token or — ``--static`` —
one calibrated scale per tensor), dequantized model and input scales out.

Run with the peer's virtualenv (``/work/venvs/llmc/bin/python``: llmcompressor 0.14.0.1,
compressed-tensors 0.19.0; ``benchmarks/peers/setup_llmc.sh``); it does not import
quantfoundry. Calibration as ``llmc_gptq.py`` (``--calib-ids``: the same token ids qf uses,
batch 1, in order, the sequential pipeline).

Recipe: ``[SmoothQuantModifier(smoothing_strength=--alpha), QuantizationModifier(config_groups=
{weights: int8 channel symmetric (memoryless_minmax), input_activations: int8 symmetric,
strategy token + dynamic, or tensor + static (observer minmax, llm-compressor's default)},
targets=["Linear"], ignore=["lm_head"])]``. SmoothQuant's mappings are llm-compressor's own for
the architecture (Llama: input_layernorm → q/k/v, post_attention_layernorm → gate/up; no linear
folds).

Output: ``--out FILE.safetensors`` with the model's floating-point state under its original
names — each quantized Linear's weight dequantized with compressed-tensors' ``forward_quantize``
(checked to be on its grid), the smoothed norms as they are after ``oneshot`` — and ``FILE.json``
with the time, settings, versions, the quantized linears and (``--static``) every input scale.
The caller simulates the input quantization itself, as the engine does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llmc_gptq import LM_HEAD, load_model_and_ids, patch_cpu_pin_memory, save_and_describe, timed_oneshot  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--calib-ids", required=True, type=Path)
    p.add_argument("--alpha", type=float, default=0.5, help="SmoothQuantModifier smoothing_strength")
    p.add_argument("--static", action="store_true", help="static per-tensor input scales (else per token)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", required=True, type=Path)
    p.set_defaults(group_size=0)  # per-channel weights (llmc_gptq's helpers check group sizes)
    return p.parse_args(argv)


def build_recipe(a: argparse.Namespace) -> list:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    weights = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel",
                               observer="memoryless_minmax")
    inputs = QuantizationArgs(num_bits=8, type="int", symmetric=True,
                              strategy="tensor" if a.static else "token", dynamic=not a.static)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=inputs)
    return [SmoothQuantModifier(smoothing_strength=a.alpha),
            QuantizationModifier(config_groups={"group_0": scheme}, targets=["Linear"], ignore=[LM_HEAD])]


def run(a: argparse.Namespace) -> int:
    import torch
    from compressed_tensors.offload import remove_dispatch
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    patches = patch_cpu_pin_memory()
    loaded = load_model_and_ids(a)
    if loaded is None:
        return 2
    ids, tok, model = loaded
    recipe = build_recipe(a)
    seconds, _records, _warnings = timed_oneshot(a, model, tok, ids, recipe, log_level="WARNING")
    remove_dispatch(model)
    tensors: dict[str, torch.Tensor] = {}
    scales: dict[str, float] = {}
    quantized: list[str] = []
    worst_requant = 0.0
    with torch.no_grad():
        for name, m in model.named_modules():
            scheme = getattr(m, "quantization_scheme", None)
            if not isinstance(m, torch.nn.Linear) or scheme is None or scheme.weights is None:
                continue
            w_deq = forward_quantize(m, m.weight.data, "weight", scheme.weights)
            worst_requant = max(worst_requant, float(
                (forward_quantize(m, w_deq, "weight", scheme.weights) - w_deq).abs().max()))
            tensors[f"{name}.weight"] = w_deq.float().cpu().contiguous()
            quantized.append(name)
            if a.static:
                scales[name] = float(m.input_scale.float().reshape(-1)[0])
        for name, t in model.state_dict().items():
            if name not in tensors and t.dtype.is_floating_point and "weight_scale" not in name \
                    and "input_scale" not in name and "zero_point" not in name:
                tensors[name] = t.float().cpu().contiguous().clone()  # tied embeddings: no shared memory
    a.out.parent.mkdir(parents=True, exist_ok=True)
    settings: dict[str, Any] = {"smoothing_strength": a.alpha, "weights": "int8 channel symmetric",
                                "inputs": "int8 tensor static (minmax)" if a.static else "int8 token dynamic",
                                "targets": ["Linear"], "ignore": [LM_HEAD]}
    result = {**save_and_describe(a, tensors, settings, seconds, ids, "llmc_smoothquant.py"),
              "quantized_linears": quantized, "input_scales": scales, "patches": patches,
              "checks": {"requantize_max_abs_change": worst_requant}}
    a.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"oneshot {seconds:.2f} s; {len(quantized)} quantized linears")
    return 0


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return run(a)


if __name__ == "__main__":
    sys.exit(main())

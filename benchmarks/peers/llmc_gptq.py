"""Peer GPTQ runner: llm-compressor's ``GPTQModifier``, dequantized weights out.

What it measures
----------------
The wall time of one ``llmcompressor.oneshot`` call that runs GPTQ
(weight-only integer quantization of every ``nn.Linear`` but ``lm_head``) on a
Hugging Face causal LM with caller-given calibration token ids, and the weights
it produces. Only the ``oneshot`` call is timed (``time.perf_counter``, after
the model, tokenizer and dataset are built; on CUDA the device is synchronized
on both sides). That call includes what llm-compressor does inside it: building
its dataloader, tracing the model into per-decoder-layer subgraphs (the
"sequential" pipeline), the calibration forward passes that accumulate each
layer's Hessian, GPTQ itself, and the propagation passes that feed the
*quantized* layer's outputs to the next layer (``propagate_error=True``, the
llm-compressor default and the original GPTQ behaviour).

It is run with the peer's own virtualenv (``/work/venvs/llmc/bin/python``:
llmcompressor 0.14.0.1, compressed-tensors 0.19.0, transformers <= 5.17) and
does not import quantfoundry.

How
---
* Calibration: ``--calib-ids`` is a ``torch.save``-d int64 tensor
  ``[n_samples, seq_len]``. It becomes a ``datasets.Dataset`` with columns
  ``input_ids`` and ``attention_mask`` (ones), one row per sample, passed to
  ``oneshot`` with ``num_calibration_samples=n_samples``,
  ``max_seq_length=seq_len``, ``shuffle_calibration_samples=False`` and
  ``batch_size=1``. llm-compressor treats a dataset that already has
  ``input_ids`` as tokenized and uses it as is; every sample is used once (its
  length-aware sampler may visit equal-length rows in another order, which
  only changes the summation order of the Hessian).
* Scheme: one config group, ``targets=["Linear"]``, ``ignore=["lm_head"]``,
  weights only: ``QuantizationArgs(num_bits, type="int", symmetric,
  strategy="group" with group_size | "channel" for --group-size 0,
  observer="memoryless_minmax")`` -- the min-max weight observer (llm-compressor
  swaps ``"minmax"`` for it on weights anyway, with a warning; weights are
  observed once, so the two agree). It gives the plain GPTQ grid:
  symmetric ``scale = max|w| / ((2^b - 1) / 2)``, levels ``[-2^(b-1), 2^(b-1)-1]``;
  asymmetric ``scale = (max - min) / (2^b - 1)``, integer zero point
  ``round(-min / scale)`` (min/max always include 0). Note that llm-compressor
  computes every group's scale/zero point from the *original* weights before
  GPTQ runs ("static groups"), whereas the reference GPTQ code computes a
  group's scale when it reaches the group's first column, from the
  error-updated weights.
* ``GPTQModifier(block_size=--block-size, dampening_frac=--damp, actorder=...)``.

Activation order (``--act-order``)
----------------------------------
compressed-tensors 0.19 knows ``ActivationOrdering.WEIGHT`` (alias
``"static"``) and has *removed* ``"group"`` (alias ``"dynamic"``, the old
desc_act-with-``g_idx`` mode: its validator raises). With ``"static"``,
llm-compressor's GPTQ permutes the columns by descending ``diag(H)``, runs the
GPTQ sweep in that order, and keeps group membership by *original* column
index (group scales precomputed as above), then un-permutes. That is exactly
GPTQ ``desc_act=True`` with ``static_groups=True`` (AutoGPTQ/GPTQModel terms):
act-order processing, contiguous groups, no ``g_idx`` needed. So
``--act-order`` maps to ``actorder="static"``; without it ``actorder=None``
is passed explicitly (the modifier's own default is ``"static"``).

Output
------
``--out FILE.safetensors``: for every quantized Linear, its dequantized weight
as float32 under ``"<module name>.weight"`` (e.g.
``model.layers.0.self_attn.q_proj.weight``). The weight is computed with
compressed-tensors' ``forward_quantize`` -- the very function the quantized
module's forward applies to its weight (fake quantization with the module's
``weight_scale`` / ``weight_zero_point``) -- and checked per module:
``F.linear(x, W_deq, bias)`` equals the module's forward on a random input
(max abs diff <= 1e-5 x max(1, |y|)), and re-quantizing ``W_deq`` leaves it
unchanged (it lies on the grid). A sibling ``FILE.json`` records the time,
settings, versions, calibration shape and hash, device, checks, the layers
left unquantized, GPTQ's RTN fallbacks (non-positive-definite Hessians) and
the warnings llm-compressor logged, and per layer GPTQ's own loss and time
(``gptq_layers``, from llm-compressor's METRIC log lines).

CPU-only torch
--------------
``IntermediatesCache`` can pin CPU memory (``Tensor.pin_memory``), which a
CPU-only torch refuses ("Cannot access accelerator device"). In 0.14.0.1 only
AWQ calls it, but when no accelerator is present the script replaces
``IntermediatesCache._pin_intermediate`` with a no-op all the same (recorded
under ``patches`` in the JSON). ``--device cpu`` hides CUDA devices
(``CUDA_VISIBLE_DEVICES=""``) before torch is imported, since llm-compressor
picks its execution device itself (the first accelerator, if any). With
``--device cuda`` the model is loaded on the CPU and llm-compressor onloads one
decoder layer at a time to ``cuda:0``, as it does by default; on CUDA it may
use its Triton GPTQ kernel (recorded as ``triton_available``; set
``LLMCOMPRESSOR_DISABLE_GPTQ_TRITON=1`` to force the eager path).

Group sizes
-----------
Group quantization needs ``in_features % group_size == 0`` for every targeted
Linear (llm-compressor refuses otherwise, e.g. SmolLM2's 576 columns at g128):
the script checks this before calibrating and exits with status 2 naming the
layers. Use a group size that divides them (g64 for SmolLM2) or 0 (per channel).

Example::

    /work/venvs/llmc/bin/python benchmarks/peers/llmc_gptq.py \
        --model /work/main/core/quantfoundry/data/pycode-7m \
        --calib-ids calib.pt --bits 4 --group-size 128 --sym \
        --device cpu --out /tmp/llmc/w4g128.safetensors
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported lazily: --device cpu must act before torch loads
    import torch
    from llmcompressor.modifiers.gptq import GPTQModifier
    from transformers import PreTrainedModel

LM_HEAD = "lm_head"
FORWARD_ATOL = 1e-5
DTYPES = ("float32", "bfloat16", "float16")
OBSERVER = "memoryless_minmax"


def base_parser(description: str, epilog: str | None,
                asym_help: str = "asymmetric grid with an integer zero point") -> argparse.ArgumentParser:
    """The options both peer runners take first: model, calibration ids, the integer grid."""
    p = argparse.ArgumentParser(description=description, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="Hugging Face model folder")
    p.add_argument("--calib-ids", required=True, type=Path,
                   help="torch.save'd int64 tensor [n_samples, seq_len] of token ids")
    p.add_argument("--bits", type=int, choices=(2, 3, 4, 8), default=4)
    p.add_argument("--group-size", type=int, default=128, help="columns per group; 0 = per channel")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="symmetric", action="store_true", default=True,
                     help="symmetric grid (default)")
    sym.add_argument("--asym", dest="symmetric", action="store_false", help=asym_help)
    return p


def add_run_args(p: argparse.ArgumentParser, dtype_help: str) -> None:
    """The options both peer runners take last: device, dtype, output file."""
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help=dtype_help)
    p.add_argument("--out", required=True, type=Path, help="output .safetensors")


def check_common(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Refusals both peer runners share."""
    if a.group_size < 0:
        p.error("--group-size must be >= 0")
    if a.out.suffix != ".safetensors":
        p.error("--out must end in .safetensors")


def weight_scheme(a: argparse.Namespace):  # noqa: ANN201  (compressed_tensors loads lazily)
    """The integer weight-only ``QuantizationScheme`` both runners quantize with."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    weights = QuantizationArgs(
        num_bits=a.bits, type="int", symmetric=a.symmetric,
        strategy="channel" if a.group_size == 0 else "group",
        group_size=None if a.group_size == 0 else a.group_size,
        observer=OBSERVER)
    return QuantizationScheme(targets=["Linear"], weights=weights)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = base_parser("Run llm-compressor's GPTQModifier and save dequantized Linear weights.", __doc__)
    p.add_argument("--act-order", action="store_true",
                   help='actorder="static" (desc_act with static groups); default actorder=None')
    p.add_argument("--damp", type=float, default=0.01, help="dampening_frac (of mean diag(H))")
    p.add_argument("--block-size", type=int, default=128, help="GPTQ lazy-batch block size")
    add_run_args(p, "dtype the model is loaded in (GPTQ itself runs in float32)")
    a = p.parse_args(argv)
    check_common(p, a)
    if a.block_size <= 0 or a.damp < 0:
        p.error("--block-size must be > 0 and --damp >= 0")
    return a


def load_calib_ids(path: Path) -> torch.Tensor:
    """The calibration ids: a 2-D integer tensor, as int64."""
    import torch
    ids = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.dtype.is_floating_point:
        raise SystemExit(f"{path}: expected an integer tensor [n_samples, seq_len], got "
                         f"{type(ids).__name__} {getattr(ids, 'shape', '')} {getattr(ids, 'dtype', '')}")
    return ids.to(torch.int64).contiguous()


def group_size_violations(model: torch.nn.Module, group_size: int) -> list[str]:
    """Targeted Linears whose in_features the group size does not divide."""
    import torch
    if group_size == 0:
        return []
    return [f"{name} (in_features={m.in_features})" for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.split(".")[-1] != LM_HEAD
            and m.in_features % group_size]


def build_modifier(a: argparse.Namespace) -> GPTQModifier:
    """The GPTQModifier for the requested integer weight-only scheme."""
    from llmcompressor.modifiers.gptq import GPTQModifier
    return GPTQModifier(config_groups={"group_0": weight_scheme(a)}, targets=["Linear"], ignore=[LM_HEAD],
                        block_size=a.block_size, dampening_frac=a.damp,
                        actorder="static" if a.act_order else None)


def patch_cpu_pin_memory() -> list[str]:
    """Make IntermediatesCache's memory pinning a no-op when torch has no accelerator."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache
    if torch.accelerator.is_available():
        return []
    IntermediatesCache._pin_intermediate = classmethod(lambda cls, intermediate: None)
    return ["llmcompressor.pipelines.cache.IntermediatesCache._pin_intermediate -> no-op (no accelerator)"]


def extract_dequantized(model: PreTrainedModel) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Dequantized float32 weights of every quantized Linear, checked against its forward.

    Returns the tensors by ``"<module>.weight"`` and a report: checks (worst
    forward mismatch, worst re-quantization change, worst difference to the
    module's stored weight), layers skipped and other notes.
    """
    import torch
    import torch.nn.functional as F
    from compressed_tensors.offload import remove_dispatch
    from compressed_tensors.quantization import QuantizationStatus
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    gen = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    notes: list[str] = []
    # with --device cuda, the sequential pipeline leaves every module offloaded (weights on the
    # CPU, onloaded per forward); read the offloaded copies — what save_pretrained writes — with
    # the onloading removed, so the forward check below runs on exactly those tensors
    remove_dispatch(model)
    notes.append("compressed_tensors.offload.remove_dispatch(model) before extraction")
    worst = {"forward_max_abs_diff": 0.0, "forward_max_rel_diff": 0.0,
             "requantize_max_abs_change": 0.0, "stored_weight_max_abs_diff": 0.0}
    with torch.no_grad():
        for name, m in model.named_modules():
            if not isinstance(m, torch.nn.Linear):
                continue
            scheme = getattr(m, "quantization_scheme", None)
            if scheme is None or scheme.weights is None:
                skipped.append(name)
                continue
            status = getattr(m, "quantization_status", None)
            if status is None or status >= QuantizationStatus.COMPRESSED:
                raise RuntimeError(f"{name}: unexpected quantization status {status}")
            if hasattr(m, "weight_g_idx"):
                notes.append(f"{name} has weight_g_idx (not used by its forward in this version)")
            w = m.weight.data
            w_deq = forward_quantize(m, w, "weight", scheme.weights)
            x = torch.randn(8, m.in_features, generator=gen).to(device=w.device, dtype=w.dtype)
            y_mod = m(x)
            y_lin = F.linear(x, w_deq, m.bias)
            diff = (y_mod - y_lin).abs().max().item()
            bound = FORWARD_ATOL * max(1.0, y_mod.abs().max().item())
            if diff > bound:
                raise RuntimeError(f"{name}: F.linear(x, W_deq) differs from the module's "
                                   f"forward by {diff:.3g} (> {bound:.3g})")
            requant = (forward_quantize(m, w_deq, "weight", scheme.weights) - w_deq).abs().max().item()
            worst["forward_max_abs_diff"] = max(worst["forward_max_abs_diff"], diff)
            worst["forward_max_rel_diff"] = max(worst["forward_max_rel_diff"],
                                                diff / max(1.0, y_mod.abs().max().item()))
            worst["requantize_max_abs_change"] = max(worst["requantize_max_abs_change"], requant)
            worst["stored_weight_max_abs_diff"] = max(worst["stored_weight_max_abs_diff"],
                                                      (w - w_deq).abs().max().item())
            tensors[f"{name}.weight"] = w_deq.detach().to(device="cpu", dtype=torch.float32).contiguous()
    return tensors, {"checks": worst, "skipped_linear_layers": skipped, "notes": notes}


def split_log(records: list[tuple[str, str]]) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Per-layer GPTQ metrics and the warnings from llm-compressor's log records.

    llm-compressor logs ``Quantizing N module(s): [names]`` (INFO), then per
    module ``time Xs`` and ``error Y`` (level METRIC; Y is GPTQ's summed
    squared-error loss, the batch's time when modules are batched on CUDA).
    """
    layers: dict[str, dict[str, float]] = {}
    logged: list[str] = []
    names: list[str] = []
    t_i = e_i = 0
    for level, message in records:
        if level == "INFO" and message.startswith("Quantizing ") and "module(s): " in message:
            names, t_i, e_i = ast.literal_eval(message.split("module(s): ", 1)[1]), 0, 0
        elif level == "METRIC" and message.startswith("time ") and t_i < len(names):
            layers.setdefault(names[t_i], {})["seconds"] = float(message[5:].rstrip("s"))
            t_i += 1
        elif level == "METRIC" and message.startswith("error ") and e_i < len(names):
            layers.setdefault(names[e_i], {})["loss"] = float(message[6:])
            e_i += 1
        elif level in ("WARNING", "ERROR", "CRITICAL"):
            logged.append(f"{level}: {message}")
    return layers, logged


def versions() -> dict[str, str]:
    """Versions of the packages that decide the result."""
    from importlib.metadata import version
    return {pkg: version(pkg) for pkg in
            ("llmcompressor", "compressed-tensors", "transformers", "torch", "datasets", "safetensors")}


def run(a: argparse.Namespace) -> int:
    """Load, calibrate + quantize (timed), extract, save. Returns the exit status."""
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    patches = patch_cpu_pin_memory()

    loaded = load_model_and_ids(a)
    if loaded is None:
        return 2
    ids, tok, model = loaded

    modifier = build_modifier(a)
    seconds, records, py_warnings = timed_oneshot(a, model, tok, ids, [modifier], log_level="INFO")

    gptq_layers, logged = split_log(records)
    tensors, report = extract_dequantized(model)
    if not tensors:
        raise RuntimeError("no quantized Linear found after oneshot")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    settings: dict[str, Any] = {
        "bits": a.bits, "group_size": a.group_size,
        "strategy": "channel" if a.group_size == 0 else "group",
        "symmetric": a.symmetric, "act_order": a.act_order,
        "actorder": "static" if a.act_order else None,
        "dampening_frac": a.damp, "block_size": a.block_size, "observer": "memoryless_minmax",
        "targets": ["Linear"], "ignore": [LM_HEAD], "model_dtype": a.dtype,
        "pipeline": "sequential", "batch_size": 1, "propagate_error": True,
    }
    from compressed_tensors.utils.triton import HAS_TRITON
    result: dict[str, Any] = {
        **save_and_describe(a, tensors, settings, seconds, ids, "llmc_gptq.py"),
        "triton_available": bool(HAS_TRITON) and a.device == "cuda",
        "triton_disabled_by_env": os.environ.get("LLMCOMPRESSOR_DISABLE_GPTQ_TRITON", "0") == "1",
        "quantized_layers": len(tensors),
        "skipped_linear_layers": report["skipped_linear_layers"],
        "rtn_fallback_layers": list(getattr(modifier, "_rtn_fallback_module_names", [])),
        "gptq_layers": gptq_layers,
        "checks": report["checks"],
        "notes": report["notes"],
        "patches": patches,
        "warnings": sorted(set(logged) | {f"{w.category.__name__}: {w.message}" for w in py_warnings}),
        "out": str(a.out.resolve()),
    }
    a.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"oneshot {seconds:.2f} s; {len(tensors)} layers -> {a.out} "
          f"(forward check max abs diff {report['checks']['forward_max_abs_diff']:.2e})")
    return 0


def load_model_and_ids(a: argparse.Namespace) -> tuple[Any, Any, Any] | None:
    """``(ids, tokenizer, model)`` for the run, or ``None`` (after printing why) when the group
    size does not divide some linear's inputs, which llm-compressor refuses."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = load_calib_ids(a.calib_ids)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=getattr(torch, a.dtype))
    model.eval()
    if int(ids.max()) >= model.config.vocab_size or int(ids.min()) < 0:
        raise SystemExit(f"{a.calib_ids}: ids outside [0, {model.config.vocab_size})")
    bad = group_size_violations(model, a.group_size)
    if bad:
        shown = "\n  ".join(bad[:6]) + (f"\n  ... and {len(bad) - 6} more" if len(bad) > 6 else "")
        print(f"error: --group-size {a.group_size} does not divide in_features of {len(bad)} "
              f"Linear layer(s); llm-compressor refuses group quantization there (use a group "
              f"size that divides them, or 0 for per channel):\n  {shown}", file=sys.stderr)
        return None
    return ids, tok, model


def timed_oneshot(a: argparse.Namespace, model: Any, tok: Any, ids: Any, recipe: list, *, log_level: str
                  ) -> tuple[float, list[tuple[str, str]], list]:
    """Run ``oneshot`` on the calibration ids (one row per sample, in order, batch 1, the
    sequential pipeline) and time that call alone. Returns ``(seconds, llm-compressor's log
    records at log_level and above, Python warnings)``."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from loguru import logger

    n_samples, seq_len = map(int, ids.shape)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    records: list[tuple[str, str]] = []
    sink = logger.add(lambda msg: records.append((msg.record["level"].name, msg.record["message"])),
                      level=log_level)
    with warnings.catch_warnings(record=True) as py_warnings:
        warnings.simplefilter("default")
        if a.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        oneshot(model=model, processor=tok, dataset=ds, recipe=recipe,
                num_calibration_samples=n_samples, max_seq_length=seq_len,
                shuffle_calibration_samples=False, batch_size=1, pipeline="sequential")
        if a.device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    logger.remove(sink)
    return seconds, records, list(py_warnings)


def save_and_describe(a: argparse.Namespace, tensors: dict, settings: dict[str, Any], seconds: float,
                      ids: Any, producer: str) -> dict[str, Any]:
    """Write ``tensors`` to ``a.out`` (settings in the metadata) and return the run record both
    peer runners share: time, settings, versions, calibration ids, model, machine."""
    import torch
    from llmcompressor.utils.dev import get_main_device
    from safetensors.torch import save_file

    save_file(tensors, str(a.out), metadata={"producer": producer, "settings": json.dumps(settings)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main_device = str(get_main_device())
    return {
        "seconds": round(seconds, 4),
        "timed": "llmcompressor.oneshot(...) call only (model already loaded)",
        "settings": settings,
        "versions": versions(),
        "n_samples": int(ids.shape[0]), "seq_len": int(ids.shape[1]),
        "calib_ids": str(a.calib_ids.resolve()),
        "calib_ids_sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest(),
        "model": str(a.model.resolve()),
        "device": a.device, "execution_device": main_device,
        "gpu": torch.cuda.get_device_name(0) if a.device == "cuda" else None,
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, pin the device choice before torch loads, run."""
    a = parse_args(argv)
    if a.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return run(a)


if __name__ == "__main__":
    sys.exit(main())

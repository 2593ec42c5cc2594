"""Peer AWQ runner: llm-compressor's ``AWQModifier`` + ``QuantizationModifier``, dequantized model out.

What it measures
----------------
The wall time of one ``llmcompressor.oneshot`` call that runs AWQ (activation-
aware channel scaling, then weight-only integer quantization of every
``nn.Linear`` but ``lm_head``) on a Hugging Face causal LM with caller-given
calibration token ids, and the weights it produces. Only the ``oneshot`` call
is timed (``time.perf_counter``, after the model, tokenizer and dataset are
built; on CUDA the device is synchronized on both sides). That call includes
what llm-compressor does inside it: building its dataloader, tracing the model
into per-decoder-layer subgraphs (the "sequential" pipeline), the calibration
forward passes that collect each smoothed layer's mean |activation| and the
parent module's inputs, AWQ's grid search per mapping (every grid point
re-quantizes the balance layers and re-runs the parent module on all cached
samples), folding the chosen scales into the model, the final min-max weight
quantization, and the propagation passes that feed each smoothed, quantized
layer's outputs to the next layer.

It is run with the peer's own virtualenv (``/work/venvs/llmc/bin/python``:
llmcompressor 0.14.0.1, compressed-tensors 0.19.0, transformers <= 5.17) and
does not import quantfoundry. It imports the model-agnostic helpers of its
sibling ``llmc_gptq.py`` (calibration loading, group-size check, the CPU
pin-memory patch, dequantized-weight extraction, versions).

How
---
* Calibration: exactly as ``llmc_gptq.py``: ``--calib-ids`` is a
  ``torch.save``-d int64 tensor ``[n_samples, seq_len]``; it becomes a
  ``datasets.Dataset`` with ``input_ids`` and ``attention_mask`` (ones), passed
  to ``oneshot`` with ``num_calibration_samples=n_samples``,
  ``max_seq_length=seq_len``, ``shuffle_calibration_samples=False``,
  ``batch_size=1`` and ``pipeline="sequential"``.
* Recipe: ``[AWQModifier(**awq), QuantizationModifier(config_groups=...,
  targets=["Linear"], ignore=["lm_head"])]`` (the split form that 0.14 asks
  for: ``llmcompressor.modifiers.awq.AWQModifier`` is a deprecated shim that
  builds these two). ``awq`` holds only what the command line sets:
  ``duo_scaling`` (``--duo-scaling`` / ``--no-duo-scaling``; default: not
  passed, llm-compressor's default ``True``) and ``n_grid`` (``--n-grid``;
  default: not passed, llm-compressor's ``20``); the values the modifier
  actually used are recorded. ``mappings`` is not passed, so they are
  inferred from the architecture (``AWQ_MAPPING_REGISTRY``; Llama, Qwen2,
  Mistral, ... use ``default_mappings``: input_layernorm -> q/k/v_proj,
  v_proj -> o_proj, post_attention_layernorm -> gate/up_proj, up_proj ->
  down_proj). ``offload_device`` is left to its default (``None`` for dense
  models, CPU for MoE). llm-compressor's AWQ has no weight-clipping search
  (the reference llm-awq's ``auto_clip``): scales only.
* Scheme: one config group, ``targets=["Linear"]``, ``ignore=["lm_head"]``,
  weights only: ``QuantizationArgs(num_bits, type="int", symmetric,
  strategy="group" with group_size | "channel" for --group-size 0,
  observer="memoryless_minmax")``. With ``--bits 4 --group-size 128 --asym``
  this is the preset ``W4A16_ASYM`` (whose ``minmax`` weight observer
  llm-compressor swaps for ``memoryless_minmax`` anyway); ``--sym`` gives
  ``W4A16``. AWQ's grid search quantizes with ``memoryless_minmax`` too, so
  the search and the final weights use the same grid: symmetric
  ``scale = max|w| / ((2^b - 1) / 2)``; asymmetric
  ``scale = (max - min) / (2^b - 1)`` with an integer zero point.
* Duo scaling: ``True`` searches ``s = mean|x|^r / (mean_w^(1-r) + 1e-4)``
  (``mean_w``: per input channel mean of the group-normalized |W| of the
  balance layers) over ``n_grid - 1`` ratios plus the identity; ``False``
  searches ``s = mean|x|^r`` over ``n_grid`` ratios in [0, 1].

Mappings and GQA
----------------
llm-compressor skips a ``v_proj -> o_proj`` mapping whose shapes do not match
(``v_proj.out_features != o_proj.in_features``: every grouped-query-attention
model, e.g. the default model with 2 KV heads of 4), logging it at DEBUG
level only, with one WARNING giving the count. The script wraps
``AWQModifier._set_resolved_mappings`` (to copy the resolved mappings before
``on_finalize`` clears them) and ``AWQModifier._log_error_metrics`` (to copy
the per-mapping loss before/after the search), and adds a DEBUG log sink; the
JSON's ``awq_mappings`` lists the mappings resolved (with their balance
layers, the loss before and after AWQ's search) and those skipped with
llm-compressor's reason. The wrappers only read; they change nothing.

Output
------
``--out FILE.safetensors``: the whole model as float32, under the original
model's ``state_dict`` names (every floating-point entry), so that
``model.load_state_dict(load_file(FILE), strict=True)`` works on a plain
transformers model of the original architecture:

* every quantized Linear's weight is its *dequantized* weight, computed as in
  ``llmc_gptq.py`` with compressed-tensors' ``forward_quantize`` (what the
  module's forward applies to its weight after ``oneshot``: fake quantization
  of the AWQ-scaled weight with its ``weight_scale`` / ``weight_zero_point``)
  and checked against the module's forward and for being on the grid;
* every other tensor is the model's value after ``oneshot``: in particular the
  RMSNorm weights into which AWQ folded ``1/s`` (and, on non-GQA models,
  ``v_proj``'s rows, a quantized Linear anyway). The quantization parameters
  llm-compressor adds (``weight_scale``, ``weight_zero_point``, ...) are not
  saved.

A sibling ``FILE.json`` records the time, settings (AWQ ones included, with
whether each was the default), versions, calibration shape and hash, device,
checks, the layers left unquantized, the non-quantized tensors whose values
AWQ changed (``changed_params``: name -> max |change|), the AWQ mappings and
the warnings llm-compressor logged.

CPU-only torch
--------------
AWQ pins the cached parent-module inputs of each mapping
(``IntermediatesCache.pin_memory`` -> ``Tensor.pin_memory``) before its grid
search; a CPU-only torch refuses ("Cannot access accelerator device"). When no
accelerator is present the script replaces
``IntermediatesCache._pin_intermediate`` (what ``pin_memory`` calls per
cached value) with a no-op before ``oneshot`` (recorded under ``patches``).
Pinning only speeds up host-to-device copies, so this changes no result.
``--device cpu`` hides CUDA devices (``CUDA_VISIBLE_DEVICES=""``) before torch
is imported, so the patch applies there too; with ``--device cuda`` the model
is loaded on the CPU and llm-compressor onloads one decoder layer at a time to
``cuda:0``.

Group sizes
-----------
As in ``llmc_gptq.py``: ``in_features % group_size`` must be 0 for every
targeted Linear, checked before calibrating (exit status 2 naming the layers).

Example::

    /work/venvs/llmc/bin/python benchmarks/peers/llmc_awq.py \\
        --model /work/main/core/quantfoundry/data/pycode-7m \\
        --calib-ids calib.pt --bits 4 --group-size 128 --asym \\
        --device cpu --out /tmp/llmc/awq_w4g128.safetensors
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llmc_gptq import (  # noqa: E402  (stdlib-only at import: torch still unloaded)
    LM_HEAD,
    OBSERVER,
    add_run_args,
    base_parser,
    check_common,
    extract_dequantized,
    load_model_and_ids,
    patch_cpu_pin_memory,
    save_and_describe,
    timed_oneshot,
    weight_scheme,
)

if TYPE_CHECKING:  # imported lazily: --device cpu must act before torch loads
    import torch
    from llmcompressor.modifiers import Modifier
    from transformers import PreTrainedModel



def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = base_parser("Run llm-compressor's AWQModifier + QuantizationModifier and save the "
                    "dequantized model.", __doc__,
                    "asymmetric grid with an integer zero point (W4A16_ASYM at 4 bits, g128)")
    duo = p.add_mutually_exclusive_group()
    duo.add_argument("--duo-scaling", dest="duo_scaling", action="store_const", const=True,
                     default=None, help="duo_scaling=True (activations and weights)")
    duo.add_argument("--no-duo-scaling", dest="duo_scaling", action="store_const", const=False,
                     help="duo_scaling=False (activations only)")
    p.add_argument("--n-grid", type=int, default=None,
                   help="grid points of AWQ's scale search (default: llm-compressor's)")
    add_run_args(p, "dtype the model is loaded in")
    a = p.parse_args(argv)
    check_common(p, a)
    if a.n_grid is not None and a.n_grid < (2 if a.duo_scaling is False else 3):
        p.error("--n-grid must be >= 3 (>= 2 with --no-duo-scaling)")
    return a


def build_recipe(a: argparse.Namespace) -> list[Modifier]:
    """[AWQModifier, QuantizationModifier] for the requested integer weight-only scheme."""
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    scheme = weight_scheme(a)
    awq_kwargs: dict[str, Any] = {}
    if a.duo_scaling is not None:
        awq_kwargs["duo_scaling"] = a.duo_scaling
    if a.n_grid is not None:
        awq_kwargs["n_grid"] = a.n_grid
    return [AWQModifier(**awq_kwargs),
            QuantizationModifier(config_groups={"group_0": scheme}, targets=["Linear"],
                                 ignore=[LM_HEAD])]


def instrument_awq() -> tuple[dict[str, Any], list[str]]:
    """Read-only wrappers that keep AWQ's resolved mappings and per-mapping losses.

    ``on_finalize`` clears both; the wrappers copy them first. Returns the dict
    they fill (``resolved``: list, ``metrics``: list) and a description.
    """
    from llmcompressor.modifiers.transform.awq import AWQModifier
    seen: dict[str, Any] = {"resolved": [], "metrics": []}
    set_resolved = AWQModifier._set_resolved_mappings
    log_metrics = AWQModifier._log_error_metrics

    def _set_resolved_mappings(self, model):  # noqa: ANN001, ANN202
        out = set_resolved(self, model)
        seen["resolved"] = [{"smooth": m.smooth_name, "balance": list(m.balance_names),
                             "parent": m.parent_name} for m in self._resolved_mappings]
        return out

    def _log_error_metrics(self):  # noqa: ANN001, ANN202
        seen["metrics"] = [dict(m) for m in self._error_metrics]
        return log_metrics(self)

    AWQModifier._set_resolved_mappings = _set_resolved_mappings
    AWQModifier._log_error_metrics = _log_error_metrics
    return seen, ["AWQModifier._set_resolved_mappings, AWQModifier._log_error_metrics: "
                  "wrapped read-only to record resolved mappings and their losses"]


def summarize_mappings(seen: dict[str, Any], records: list[tuple[str, str]],
                       unresolved: list[str]) -> dict[str, Any]:
    """AWQ's mappings: patterns, resolved ones with losses, skipped ones with reasons."""
    metrics = {m["layer_name"]: m for m in seen["metrics"]}
    resolved = []
    for m in seen["resolved"]:
        entry = dict(m)
        met = metrics.get(m["smooth"])
        if met is not None:
            entry.update(initial_error=float(met["initial_error"]),
                         best_error=float(met["best_error"]), reduction=float(met["reduction"]))
        else:
            entry["smoothed"] = False
        resolved.append(entry)
    skipped = []
    for level, message in records:
        if message.startswith("Skipping ") and " for mapping " in message:
            head, _, reason = message.partition(" because ")
            smooth, _, mapping = head[len("Skipping "):].partition(" for mapping ")
            skipped.append({"smooth": smooth, "mapping": mapping,
                            "reason": reason.rstrip("."), "log_level": level})
        elif message.startswith("Skipping smooth_layer "):
            skipped.append({"smooth": message[len("Skipping smooth_layer "):].split(",")[0],
                            "reason": message, "log_level": level})
    return {"patterns": unresolved, "n_resolved": len(resolved), "n_skipped": len(skipped),
            "resolved": resolved, "skipped": skipped}


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (any dtype)."""
    import torch
    return hashlib.sha256(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
                          .numpy().tobytes()).hexdigest()


def snapshot(model: PreTrainedModel, skip: set[str]) -> dict[str, tuple[str, torch.Tensor | None]]:
    """Before oneshot: digest of every state_dict entry not in ``skip``, and a copy of the 1-D ones."""
    return {name: (tensor_digest(t), t.detach().clone() if t.ndim <= 1 else None)
            for name, t in model.state_dict().items() if name not in skip}


def full_state(model: PreTrainedModel, names: list[str], dequant: dict[str, torch.Tensor],
               before: dict[str, tuple[str, torch.Tensor | None]]
               ) -> tuple[dict[str, torch.Tensor], dict[str, float | None], list[str]]:
    """float32 CPU tensors for the original state_dict names; changed params; non-float names.

    Each tensor is fetched on its own (``get_parameter`` / ``get_buffer``, which
    onloads an offloaded one) and copied to the CPU at once, so an onloaded
    copy never outlives its loop step.
    """
    import torch
    out: dict[str, torch.Tensor] = {}
    changed: dict[str, float | None] = {}
    not_float: list[str] = []
    ptrs: set[int] = set()
    with torch.no_grad():
        for name in names:
            if name in dequant:
                out[name] = dequant[name]
                continue
            try:
                t = model.get_parameter(name)
            except AttributeError:
                t = model.get_buffer(name)
            if not t.dtype.is_floating_point:
                not_float.append(name)
                continue
            digest, orig = before[name]
            if tensor_digest(t) != digest:
                changed[name] = (None if orig is None
                                 else (t.detach().cpu().float() - orig.float()).abs().max().item())
            c = t.detach().to(device="cpu", dtype=torch.float32).contiguous()
            if c.data_ptr() in ptrs:  # tied / shared: safetensors wants distinct storage
                c = c.clone()
            ptrs.add(c.data_ptr())
            out[name] = c
    return out, changed, not_float


def split_log(records: list[tuple[str, str]]) -> list[str]:
    """The warnings among llm-compressor's log records."""
    return [f"{level}: {message}" for level, message in records
            if level in ("WARNING", "ERROR", "CRITICAL")]


def run(a: argparse.Namespace) -> int:
    """Load, calibrate + smooth + quantize (timed), extract, save. Returns the exit status."""
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    patches = patch_cpu_pin_memory()
    seen, instrumentation = instrument_awq()

    loaded = load_model_and_ids(a)
    if loaded is None:
        return 2
    ids, tok, model = loaded

    names = list(model.state_dict().keys())
    targets = {f"{n}.weight" for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.split(".")[-1] != LM_HEAD}
    before = snapshot(model, targets)

    recipe = build_recipe(a)
    awq = recipe[0]
    grid = awq._get_grid_search_params()
    seconds, records, py_warnings = timed_oneshot(a, model, tok, ids, recipe, log_level="DEBUG")

    dequant, report = extract_dequantized(model)
    if not dequant:
        raise RuntimeError("no quantized Linear found after oneshot")
    missing = sorted(set(dequant) - set(names))
    if missing:
        raise RuntimeError(f"quantized weights not in the original state_dict: {missing[:5]}")
    tensors, changed, not_float = full_state(model, names, dequant, before)
    unresolved = [f"{m.smooth_layer} -> {list(m.balance_layers)}" for m in (awq.mappings or [])]
    mappings = summarize_mappings(seen, records, unresolved)

    a.out.parent.mkdir(parents=True, exist_ok=True)
    settings: dict[str, Any] = {
        "bits": a.bits, "group_size": a.group_size,
        "strategy": "channel" if a.group_size == 0 else "group",
        "symmetric": a.symmetric, "observer": OBSERVER,
        "preset_equivalent": ("W4A16_ASYM" if not a.symmetric else "W4A16")
        if (a.bits, a.group_size) == (4, 128) else None,
        "duo_scaling": awq.duo_scaling,
        "duo_scaling_source": "llm-compressor default" if a.duo_scaling is None else "command line",
        "n_grid": awq.n_grid,
        "n_grid_source": "llm-compressor default" if a.n_grid is None else "command line",
        "grid_points": len(grid),
        "offload_device": None if awq.offload_device is None else str(awq.offload_device),
        "mappings": "inferred from the architecture (AWQ_MAPPING_REGISTRY)",
        "targets": ["Linear"], "ignore": [LM_HEAD], "model_dtype": a.dtype,
        "pipeline": "sequential", "batch_size": 1,
    }
    result: dict[str, Any] = {
        **save_and_describe(a, tensors, settings, seconds, ids, "llmc_awq.py"),
        "quantized_layers": len(dequant),
        "saved_tensors": len(tensors),
        "skipped_linear_layers": report["skipped_linear_layers"],
        "changed_params": changed,
        "not_saved_non_float": not_float,
        "awq_mappings": mappings,
        "checks": report["checks"],
        "notes": report["notes"],
        "patches": patches,
        "instrumentation": instrumentation,
        "warnings": sorted(set(split_log(records))
                           | {f"{w.category.__name__}: {w.message}" for w in py_warnings}),
        "out": str(a.out.resolve()),
    }
    a.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"oneshot {seconds:.2f} s; {len(dequant)} quantized layers, {len(changed)} other "
          f"tensors changed, {mappings['n_resolved']} mappings resolved / "
          f"{mappings['n_skipped']} skipped -> {a.out} "
          f"(forward check max abs diff {report['checks']['forward_max_abs_diff']:.2e})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, pin the device choice before torch loads, run."""
    a = parse_args(argv)
    if a.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return run(a)


if __name__ == "__main__":
    sys.exit(main())

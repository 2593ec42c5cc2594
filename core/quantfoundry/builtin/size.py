"""Built-in evaluator ``size``: stored bytes and bits per weight.

Every figure counts the same tensors in every column, each as the artifact stores it:

* ``linear_bytes`` / ``linear_bpw``: the weights of the linears the plan quantizes (codes,
  grid parameters, permutations, or the dequantized weight where the artifact stores that), or of the same linears in the checkpoint's float dtype for
  the original;
* ``model_bytes`` / ``model_bpw``: every parameter of the model, a tied embedding/output weight
  counted once; a tensor the plan quantizes at its format's bytes (also one that runs
  dequantized in memory, such as a GGUF file's K-quant token embedding), every other tensor in
  the dtype the artifact stores it in (``Exporter.stored_float_dtype``: GGUF's norms are F32),
  the checkpoint's for the original; a quantized weight that the artifact stores dequantized
  (``Exporter.dequantized_dtype``, a fake-quant checkpoint) at that dtype's bytes;
* ``artifact_bytes``: for a written artifact, the bytes of its files on disk (what ships,
  metadata and tokenizer included; the ``quantfoundry.json`` manifest, which evaluation itself
  rewrites, not counted).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..hookspecs import hookimpl
from ..roles.evaluator import EvalTarget, Evaluator, Metric
from ..roles.kernel import QuantLinear


class SizeEvaluator(Evaluator):
    name = "size"
    description = "bytes and bits per weight of the quantized linears and of the whole model"
    higher_is_better = {"linear_bytes": False, "linear_bpw": False, "model_bytes": False, "model_bpw": False,
                        "artifact_bytes": False}
    agreement = {"linear_bytes": (0.0, 0.0)}
    #: the original's figures depend on the plan (which linears are counted), and cost nothing
    cache_original = False

    def evaluate(self, target: EvalTarget) -> dict[str, Metric]:
        on_disk: dict[str, Metric] = {}
        if target.info.get("artifact_path"):
            folder = Path(target.info["artifact_path"])
            files = [folder] if folder.is_file() else \
                [p for p in folder.rglob("*") if p.is_file() and p.name != "quantfoundry.json"]
            on_disk["artifact_bytes"] = sum(p.stat().st_size for p in files)
        elif target.engine is not None and target.engine.artifact_bytes() is not None:
            on_disk["artifact_bytes"] = int(target.engine.artifact_bytes() or 0)
        if target.model is None:
            return on_disk
        float_bytes = target.float_dtype.itemsize if hasattr(target.float_dtype, "itemsize") else 2
        linears = set(target.info.get("quantized_linears", ()))
        # name -> Format of every tensor stored quantized (the quantized model and the artifact)
        stored: dict[str, Any] = {} if target.label == "original" else dict(target.info.get("stored_formats") or {})
        float_dtypes: dict[str, Any] = {} if target.label == "original" else \
            dict(target.info.get("stored_float_dtypes") or {})
        lin_bytes = lin_weights = model_bytes = model_weights = 0
        seen: set[int] = set()  # storage pointers (or ids) already counted
        model: nn.Module = target.model
        for name, mod in model.named_modules():
            if isinstance(mod, QuantLinear):
                qw = mod.qweight
                n = qw.shape[0] * qw.shape[1]
                dequantized = float_dtypes.get(f"{name}.weight")  # stored dequantized (a fake-quant artifact)
                b = n * dequantized.itemsize if dequantized is not None else qw.nbytes()
                model_bytes += b
                model_weights += n
                if name in linears:
                    lin_bytes += b
                    lin_weights += n
            for pname, p in mod.named_parameters(recurse=False):
                key = p.data_ptr() if p.device.type != "meta" and p.numel() else id(p)
                if key in seen:  # a tied weight (shared storage) is stored once
                    continue
                seen.add(key)
                fmt = stored.get(name) if pname == "weight" and p.dim() == 2 else None
                full = f"{name}.{pname}" if name else pname
                itemsize = float_dtypes[full].itemsize if full in float_dtypes else float_bytes
                b = fmt.nbytes(tuple(p.shape)) if fmt is not None else p.numel() * itemsize
                model_bytes += b
                model_weights += p.numel()
                if name in linears and pname == "weight":
                    lin_bytes += b
                    lin_weights += p.numel()
        out: dict[str, Metric] = {"model_bytes": int(model_bytes), "model_bpw": 8 * model_bytes / max(model_weights, 1)}
        if lin_weights:
            out["linear_bytes"] = int(lin_bytes)
            out["linear_bpw"] = 8 * lin_bytes / lin_weights
        return {**out, **on_disk}


@hookimpl
def qf_register_evaluators(register):
    register(SizeEvaluator)

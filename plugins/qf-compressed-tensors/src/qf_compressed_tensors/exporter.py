"""Exporter ``compressed-tensors``: the checkpoint llm-compressor writes and vLLM serves natively
(``quant_method: compressed-tensors``) — W8A8 int8 (per-token or static inputs), FP8 W8A8
(dynamic or static) and weight-only int4/int8 (``pack-quantized``: GPTQ/AWQ/HQQ onto vLLM's
default path).

The plan takes the requested weight format with its scales in the model's dtype (what
llm-compressor stores); ``--activations`` (or the option ``scheme``, one of llm-compressor's
preset names) sets the inputs. ``config.json`` gets ``quantization_config`` with one config
group per (weight format, input scheme) of the plan (``targets: ["Linear"]`` and the linears kept
in float under ``ignore`` when there is one group; the module names otherwise), each with its
compressor ``format`` (:mod:`qf_compressed_tensors.layout`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from quantfoundry import ActQuant, Exporter, Format, QuantizedWeight, QuantPlan, resolve_format
from quantfoundry.errors import ArtifactError, UsageError
from quantfoundry.toolkit import (
    CheckpointOptions,
    IntFormat,
    ShardedSafetensorsWriter,
    artifact_skeleton,
    attach_kv_scales,
    load_float_parameters,
    quant_method_of,
    read_manifest,
    select_kernels,
    stored_shapes,
    swap_in,
    transformers_command,
    write_hf_config,
)
from torch import nn

from .layout import compressor, from_ct, input_args, kv_args, to_ct, weight_args, weight_kind

#: llm-compressor's preset names → (weight format, input scheme)
SCHEMES: dict[str, tuple[str, str | None]] = {
    "W8A8": ("int8-sym", "int8"), "W8A8-static": ("int8-sym", "int8-static"),
    "FP8_DYNAMIC": ("fp8-e4m3", "fp8"), "FP8": ("fp8-e4m3", "fp8-static"),
    "W4A16": ("int4-g128-sym", None), "W4A16_ASYM": ("int4-g128", None), "W8A16": ("int8-g128-sym", None),
}
VERSION = "0.19.0"
_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


@dataclass(frozen=True, kw_only=True)
class CTOptions(CheckpointOptions):
    scheme: str = field(default="", metadata={
        "help": "an llm-compressor preset: " + ", ".join(SCHEMES) + " (weight format and inputs; "
                "default: --format and --activations)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scheme and self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, got {self.scheme!r}")


class CompressedTensorsExporter(Exporter):
    name = "compressed-tensors"
    description = ("compressed-tensors checkpoint (vLLM's native format): W8A8 int8/FP8, weight-only int4/int8 "
                   "pack-quantized")
    Options = CTOptions
    default_format = "int8-sym"
    can_load = True

    options: CTOptions

    def __init__(self, options: CTOptions | None = None):
        super().__init__(options)
        if self.options.scheme:
            self.default_format = SCHEMES[self.options.scheme][0]

    # -- planning ------------------------------------------------------------------------
    def storable(self) -> str:
        return ("int4/int8 grids with integer zero points (groups or per channel, sym or asym) and fp8-e4m3 "
                "(per channel or per tensor)")

    def check_format(self, fmt: Format) -> str | None:
        kind = weight_kind(fmt)
        if kind is None:
            return f"compressed-tensors stores integer grids (integer zero points) and fp8-e4m3, not {fmt.spec}"
        if kind == "int" and fmt.options.bits not in (4, 8):
            return f"vLLM's compressed-tensors kernels read 4- and 8-bit integer weights, not {fmt.options.bits}"
        return None

    def activations(self) -> ActQuant | None:
        act = SCHEMES[self.options.scheme][1] if self.options.scheme else None
        return ActQuant.from_spec(act) if act else None

    def check_activations(self, act: ActQuant, fmt: Format | None) -> str | None:
        kind = weight_kind(fmt) if fmt is not None else None
        if kind == "int" and act.dtype != "int8":
            return "integer weights go with int8 inputs (W8A8 int8)"
        if kind == "fp8" and act.dtype != "fp8":
            return "fp8 weights go with fp8 inputs (FP8 W8A8)"
        if kind == "int" and isinstance(fmt, IntFormat) and (fmt.options.bits != 8 or not fmt.options.sym
                                                              or fmt.options.group_size):
            return f"vLLM's W8A8 int8 takes int8 symmetric per-channel weights (int8-sym), not {fmt.spec}"
        return None

    def check_kv_cache(self, act: ActQuant) -> str | None:
        return None if act.dtype == "fp8" and not act.dynamic else "vLLM reads fp8 KV caches with static scales only"

    def plan(self, source: Any, requested: Format | None, *, collects_importance: bool = False) -> QuantPlan:
        if requested is None:
            raise UsageError("exporter compressed-tensors: choose a weight format (--format) or a scheme")
        reason = self.check_format(requested)
        if reason:
            raise UsageError(f"exporter compressed-tensors cannot store {requested.spec}: {reason}; "
                             f"it stores {self.storable()}")
        dtype = _DTYPE_NAMES.get(source.storage_dtype, "float16")
        stored = replace_scale_dtype(requested, dtype)
        plan = super().plan(source, stored)
        for entry in plan.quantized().values():
            if entry.format is not None and entry.format != stored:
                entry.format = replace_scale_dtype(entry.format, dtype)
        return plan

    def mix_candidates(self, source: Any, plan: QuantPlan) -> dict[str, tuple[Format | None, ...]]:
        """Config groups per layer: each planned integer linear may take the requested grid at 4
        or 8 bits (vLLM's pack-quantized kernels) or stay in float (``ignore``); fp8 linears
        choose between fp8 and float."""
        out: dict[str, tuple[Format | None, ...]] = {}
        for name, entry in plan.quantized().items():
            fmt = entry.format
            if fmt is None or source.block_index(name) is None:
                continue
            if isinstance(fmt, IntFormat):
                grids = [type(fmt)(replace(fmt.options, bits=b)) for b in (4, 8)]
                out[name] = (*(g for g in grids if g.check_shape(entry.shape) is None), None)
            else:
                out[name] = (fmt, None)
        return out

    def mix_ties(self, source: Any, plan: QuantPlan) -> list[tuple[str, ...]]:
        """vLLM fuses the linears that read one normed input (``qkv_proj``, ``gate_up_proj``) and
        needs one scheme for all of their shards."""
        ties = []
        for index in range(source.num_layers):
            prefix = source.layer_prefix(index)
            for group in source.architecture.groups:
                if group.prev_kind == "norm" and len(group.linears) > 1:
                    ties.append(tuple(f"{prefix}.{n}" for n in group.linears))
        return ties

    # -- writing -------------------------------------------------------------------------
    def begin(self, folder: Path, source: Any, plan: QuantPlan) -> None:
        self.folder, self.source, self.plan = folder, source, plan
        self.kv_cache = plan.kv_cache
        self.writer = ShardedSafetensorsWriter(folder, self.options.shard_mb)
        self.groups: dict[tuple[str, str | None], list[str]] = {}
        self.formats: dict[str, dict[str, Any]] = {}

    def write(self, name: str, tensor: torch.Tensor | QuantizedWeight) -> None:
        if not isinstance(tensor, QuantizedWeight):
            self.writer.add(name, tensor)
            return
        if tensor.perm is not None:
            raise ArtifactError(f"{name}: compressed-tensors 0.19 stores no column permutation (g_idx)")
        prefix = name.removesuffix(".weight")
        for part, t in to_ct(tensor).items():
            self.writer.add(f"{prefix}.{part}", t)
        act = tensor.input_quant
        self.groups.setdefault((tensor.format.spec, None if act is None else act.spec), []).append(prefix)
        self.formats[prefix] = {"format": tensor.format.to_json(), "input_quant": None if act is None else act.to_json()}

    def quantization_config(self) -> dict[str, Any]:
        linears = set(self.source.linear_shapes())
        quantized = {p for names in self.groups.values() for p in names}
        # routers (a MoE's gate: not an nn.Linear in transformers, a linear layer in vLLM) stay float too
        ignore = sorted((linears - quantized) | set(self.source.float_readers()))
        groups: dict[str, Any] = {}
        formats = set()
        for i, ((_spec, act_spec), names) in enumerate(sorted(self.groups.items(), key=lambda kv: kv[1][0])):
            fmt = self._format(names[0])
            act = ActQuant.from_spec(act_spec) if act_spec else None
            if act is not None and not act.dynamic:
                act = ActQuant.from_json(self.formats[names[0]]["input_quant"])
            form = compressor(fmt, act)
            formats.add(form)
            groups[f"group_{i}"] = {
                "format": form, "input_activations": None if act is None else input_args(act),
                "output_activations": None, "targets": ["Linear"] if len(self.groups) == 1 else sorted(names),
                "weights": weight_args(fmt)}
        return {"config_groups": groups, "format": formats.pop() if len(formats) == 1 else "mixed-precision",
                "global_compression_ratio": None, "ignore": ignore,
                "kv_cache_scheme": None if self.kv_cache is None else kv_args(),
                "quant_method": "compressed-tensors", "quantization_status": "compressed", "sparsity_config": {},
                "transform_config": {}, "version": VERSION}

    def _format(self, prefix: str) -> Format:
        return resolve_format(self.formats[prefix]["format"]["spec"])

    def finish(self, manifest: dict[str, Any]) -> dict[str, Any]:
        files = self.writer.finish()
        write_hf_config(self.source.path, self.folder, self.quantization_config())
        return {"files": files, "ct_linears": self.formats}

    def run_command(self, folder: Path) -> str | None:
        """vLLM serves it natively; transformers decompresses it (``pip install compressed-tensors``)."""
        return transformers_command(folder) + "  # needs: pip install compressed-tensors; vLLM: vllm serve " + \
            json.dumps(str(folder))

    def verify(self, folder: Path) -> None:
        manifest = read_manifest(folder)
        shapes = stored_shapes(folder, manifest.get("files") or [])
        for prefix in manifest.get("ct_linears", {}):
            if f"{prefix}.weight_scale" not in shapes:
                raise ArtifactError(f"{prefix}.weight_scale is missing from {folder}")
            if f"{prefix}.weight" not in shapes and f"{prefix}.weight_packed" not in shapes:
                raise ArtifactError(f"{prefix}: neither weight nor weight_packed is in {folder}")

    # -- reading back ----------------------------------------------------------------------
    def load(self, folder: Path, device: torch.device, kernel: str | None = None,
             dtype: torch.dtype = torch.float32) -> nn.Module:
        return load_ct_checkpoint(folder, device=device, kernel=kernel, dtype=dtype)

    @classmethod
    def claims(cls, path: Path) -> bool:
        return quant_method_of(path) == "compressed-tensors"


def replace_scale_dtype(fmt: Format, dtype: str) -> Format:
    """``fmt`` with its scales stored in ``dtype`` (the model's), as compressed-tensors stores them."""
    if weight_kind(fmt) is None or fmt.options.scale_dtype == dtype:
        return fmt
    return type(fmt)(replace(fmt.options, scale_dtype=dtype))


def load_ct_checkpoint(folder: Path, *, device: torch.device, kernel: str | None = None,
                       dtype: torch.dtype = torch.float32) -> nn.Module:
    """A model from a compressed-tensors checkpoint qf wrote (its manifest names every linear's
    format and input scheme), quantized linears as QuantLinear."""
    manifest = read_manifest(folder)
    model, source = artifact_skeleton(Path(folder), dtype)
    for prefix, info in manifest.get("ct_linears", {}).items():
        fmt = resolve_format(info["format"]["spec"])
        act = ActQuant.from_json(info["input_quant"]) if info.get("input_quant") else None
        names = [n for n in ("weight", "weight_packed", "weight_shape", "weight_scale", "weight_zero_point",
                             "input_scale") if source.has_tensor(f"{prefix}.{n}")]
        parts = source.read([f"{prefix}.{n}" for n in names])
        module = model.get_submodule(prefix)
        qw = from_ct({n: parts[f"{prefix}.{n}"] for n in names}, fmt, (module.out_features, module.in_features),
                     source.storage_dtype, act)
        swap_in(model, prefix, qw.to(device), select_kernels(fmt, device, kernel))
    model = load_float_parameters(model, source, device, dtype)
    if (json.loads((Path(folder) / "config.json").read_text()).get("quantization_config") or {}).get("kv_cache_scheme"):
        attach_kv_scales(model, source, ActQuant("fp8", dynamic=False), device)
    return model

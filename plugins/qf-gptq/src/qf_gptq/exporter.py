"""Exporter ``hf-gptq``: a Hugging Face folder in the GPTQ checkpoint layout (see
:mod:`qf_gptq.checkpoint`) for GPTQModel, transformers (with ``gptqmodel`` and ``optimum``
installed), vLLM and TGI.

Decoder-block linears become ``qweight``/``qzeros``/``scales``/``g_idx``; everything else
(embeddings, norms, the output head) stays in the checkpoint's float dtype. ``config.json``
gets ``quantization_config`` (``quant_method: gptq``, bits, group_size, desc_act, sym,
``checkpoint_format``, ``meta``) and ``quantize_config.json`` the same for loaders that read
that file first (GPTQModel, AutoGPTQ-era tools).

The default format is ``int4-g128-sym``, the one every maintained loader reads: GPTQModel,
transformers and vLLM (which serves symmetric 4- and 8-bit GPTQ only). ``checkpoint_format``
``auto`` writes a symmetric grid as v1 (``gptq``) and an asymmetric one as ``gptq_v2`` (zero
points without v1's ``− 1``): GPTQModel refuses asymmetric v1 checkpoints it did not write
itself, and reads v2 from any writer — so does transformers through it. No GPTQ layout makes an
asymmetric grid servable by vLLM; ``hf-awq`` is the asymmetric 4-bit checkpoint vLLM serves.
``docs/deploy.md`` has the commands for every engine.

A GPTQ checkpoint has one ``group_size`` for all linears, so when a width is not a multiple
of the requested group (SmolLM2's 576 columns at g128) the plan uses the largest group, halving
down to 32, that divides every quantized linear (else per-channel) and says so; qf's own
exporter keeps a per-tensor fallback instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from quantfoundry import Exporter, Format, QuantizedWeight, QuantPlan
from quantfoundry.errors import ArtifactError, UsageError
from quantfoundry.toolkit import (
    CheckpointOptions,
    IntFormat,
    ShardedSafetensorsWriter,
    artifact_skeleton,
    gptqmodel_command,
    is_moe_checkpoint,
    load_float_parameters,
    one_group_plan,
    quant_method_of,
    read_manifest,
    select_kernels,
    stored_shapes,
    swap_in,
    transformers_command,
    write_hf_config,
)
from torch import nn

from .checkpoint import GPTQ_BITS, ZERO_OFFSET, from_gptq, to_gptq

PARTS = ("qweight", "qzeros", "scales", "g_idx")


@dataclass(frozen=True, kw_only=True)
class HFGPTQOptions(CheckpointOptions):
    checkpoint_format: str = field(default="auto", metadata={
        "help": "auto (gptq for symmetric grids, gptq_v2 for asymmetric ones: what every loader reads), "
                "gptq (v1: zero points stored minus one) or gptq_v2 (zero points as they are; GPTQModel)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.checkpoint_format not in ("auto", *ZERO_OFFSET):
            raise ValueError(f"checkpoint_format must be one of auto, {', '.join(ZERO_OFFSET)}, "
                             f"got {self.checkpoint_format!r}")

    def layout(self, sym: bool) -> str:
        """The checkpoint format written for a symmetric (or asymmetric) grid."""
        if self.checkpoint_format != "auto":
            return self.checkpoint_format
        return "gptq" if sym else "gptq_v2"


class HFGPTQExporter(Exporter):
    name = "hf-gptq"
    description = "GPTQ checkpoint (qweight/qzeros/scales/g_idx, quant_method gptq) for transformers, vLLM, TGI"
    Options = HFGPTQOptions
    default_format = "int4-g128-sym"
    stores_permutation = True
    can_load = True

    options: HFGPTQOptions

    # -- planning ------------------------------------------------------------------------
    def storable(self) -> str:
        return "int grids of 2, 3, 4 or 8 bits with float16 scales (e.g. int4-g128, int4-g128-sym, int8)"

    def check_format(self, fmt: Format) -> str | None:
        if not isinstance(fmt, IntFormat):
            return f"a GPTQ checkpoint holds integer grids, not {fmt.spec}"
        if fmt.options.bits not in GPTQ_BITS:
            return f"GPTQ kernels read 2, 3, 4 or 8 bits, not {fmt.options.bits}"
        if fmt.options.scale_dtype != "float16":
            return f"GPTQ scales are float16, not {fmt.options.scale_dtype}"
        if fmt.options.zero_dtype != "uint8":
            return "GPTQ zero points are integers, not float16 (-zf16)"
        return None

    def plan(self, source: Any, requested: Format | None, *, collects_importance: bool = False) -> QuantPlan:
        requested = requested or IntFormat(IntFormat.Options(sym=True))
        reason = self.check_format(requested)
        if reason or not isinstance(requested, IntFormat):
            raise UsageError(f"exporter hf-gptq cannot store {requested.spec}: {reason}; "
                             f"it stores {self.storable()}")
        bits = requested.options.bits

        def unfit(shape: tuple[int, int]) -> str | None:
            if (shape[0] * bits) % 32 or (shape[1] * bits) % 32:
                return f"{shape} at {bits} bits does not fill whole 32-bit words"
            return None

        plan, fmt = one_group_plan(source, requested, unfit)
        self.format = fmt
        return plan

    # -- writing -------------------------------------------------------------------------
    def begin(self, folder: Path, source: Any, plan: QuantPlan) -> None:
        self.folder = folder
        self.source = source
        self.writer = ShardedSafetensorsWriter(folder, self.options.shard_mb)
        self.quantized: list[str] = []
        self.desc_act = False

    def write(self, name: str, tensor: torch.Tensor | QuantizedWeight) -> None:
        if not isinstance(tensor, QuantizedWeight):
            self.writer.add(name, tensor)
            return
        prefix = name.removesuffix(".weight")
        try:
            parts = to_gptq(tensor, self.options.layout(tensor.format.options.sym))
        except ValueError as exc:
            raise ArtifactError(f"{prefix}: {exc}") from None
        self.desc_act |= tensor.perm is not None
        for part in PARTS:
            self.writer.add(f"{prefix}.{part}", parts[part])
        self.quantized.append(prefix)

    def quantization_config(self, manifest: dict[str, Any]) -> dict[str, Any]:
        o = self.format.options
        stage = next((s for s in manifest.get("quantizer", []) if s.get("name") == "gptq"), None)
        qopts = stage["options"] if stage else {}
        return {
            "quant_method": "gptq",
            "bits": o.bits,
            "group_size": o.group_size or -1,
            "desc_act": self.desc_act,
            "sym": o.sym,
            "static_groups": bool(qopts.get("static_groups", False)),
            "true_sequential": bool(qopts.get("true_sequential", True)),
            "damp_percent": float(qopts.get("damp_percent", 0.01)),
            "lm_head": False,
            "checkpoint_format": self.options.layout(o.sym),
            "meta": {"quantizer": [f"quantfoundry:{_qf_version()}"],
                     "method": [s.get("name") for s in manifest.get("quantizer", [])]},
        }

    def finish(self, manifest: dict[str, Any]) -> dict[str, Any]:
        files = self.writer.finish()
        qcfg = self.quantization_config(manifest)
        write_hf_config(self.source.path, self.folder, qcfg)
        legacy = {k: v for k, v in qcfg.items() if k != "lm_head"}
        legacy.update(model_name_or_path=None, model_file_base_name="model")
        (self.folder / "quantize_config.json").write_text(json.dumps(legacy, indent=2) + "\n")
        return {"files": files, "gptq_linears": list(self.quantized)}

    def run_command(self, folder: Path) -> str | None:
        """transformers with its GPTQ backend (``pip install gptqmodel optimum``); docs/deploy.md: vLLM."""
        if is_moe_checkpoint(folder):  # transformers keeps a MoE's experts fused: it cannot take per-expert weights
            return gptqmodel_command(folder) + "  # needs: pip install gptqmodel (transformers cannot load MoE GPTQ/AWQ)"
        return transformers_command(folder) + "  # needs: pip install gptqmodel optimum"

    def verify(self, folder: Path) -> None:
        manifest = read_manifest(folder)
        shapes = stored_shapes(folder, manifest.get("files") or [])
        o = json.loads((folder / "config.json").read_text())["quantization_config"]
        for prefix in manifest.get("gptq_linears", []):
            missing = [p for p in PARTS if f"{prefix}.{p}" not in shapes]
            if missing:
                raise ArtifactError(f"{prefix}.{missing[0]} is missing from {folder}")
            in_f = shapes[f"{prefix}.g_idx"][0]
            if shapes[f"{prefix}.qweight"][0] * 32 != in_f * o["bits"]:
                raise ArtifactError(f"{prefix}.qweight has shape {shapes[f'{prefix}.qweight']} for {in_f} inputs")

    # -- reading back ----------------------------------------------------------------------
    def load(self, folder: Path, device: torch.device, kernel: str | None = None,
             dtype: torch.dtype = torch.float32) -> nn.Module:
        return load_gptq_checkpoint(folder, device=device, kernel=kernel, dtype=dtype)

    @classmethod
    def claims(cls, path: Path) -> bool:
        return quant_method_of(path) == "gptq"


def load_gptq_checkpoint(folder: Path, *, device: torch.device, kernel: str | None = None,
                         dtype: torch.dtype = torch.float32) -> nn.Module:
    """A model from a GPTQ (v1 or v2) checkpoint folder, quantized linears as QuantLinear with
    the int format (any GPTQ writer's, not only ours: act-order ``g_idx`` becomes ``perm``)."""
    q = json.loads((Path(folder) / "config.json").read_text()).get("quantization_config") or {}
    checkpoint_format = q.get("checkpoint_format", "gptq")
    if q.get("quant_method") != "gptq" or checkpoint_format not in ZERO_OFFSET:
        raise ArtifactError(f"{folder} is not a GPTQ (v1 or v2) checkpoint: quantization_config is {q}")
    model, source = artifact_skeleton(Path(folder), dtype)
    group = int(q.get("group_size", 128))
    fmt = IntFormat(IntFormat.Options(bits=int(q["bits"]), group_size=0 if group < 0 else group,
                                      sym=bool(q.get("sym", True))))
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or not source.has_tensor(f"{name}.qweight"):
            continue
        parts = source.read([f"{name}.{p}" for p in PARTS])
        tensors = {p: parts[f"{name}.{p}"] for p in PARTS}
        shape = (module.out_features, module.in_features)
        try:
            qw = from_gptq(tensors, fmt, shape, source.storage_dtype, checkpoint_format)
        except ValueError as exc:
            raise ArtifactError(f"{folder}: {name}: {exc}") from None
        swap_in(model, name, qw.to(device), select_kernels(fmt, device, kernel))
    return load_float_parameters(model, source, device, dtype)


def _qf_version() -> str:
    import quantfoundry

    return quantfoundry.__version__

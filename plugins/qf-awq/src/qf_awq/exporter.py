"""Exporter ``hf-awq``: a Hugging Face folder in AutoAWQ's GEMM layout (see
:mod:`qf_awq.checkpoint`), loadable by transformers, vLLM and TGI.

Decoder-block linears become ``qweight``/``qzeros``/``scales``; everything else (embeddings,
norms — which carry AWQ's folded scales —, the output head) stays in the checkpoint's float
dtype. ``config.json`` gets ``quantization_config`` (``quant_method: awq``, ``bits: 4``,
``group_size``, ``zero_point: true``, ``version: gemm``) and AutoAWQ's ``quant_config.json`` is
written beside it. One group size for the checkpoint, as with GPTQ (the largest that divides
every linear, noted); AWQ kernels need groups, so widths with no common group of at least 32
are refused before any work.
"""

from __future__ import annotations

import json
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

from .checkpoint import from_awq, to_awq

PARTS = ("qweight", "qzeros", "scales")


class HFAWQExporter(Exporter):
    name = "hf-awq"
    description = "AutoAWQ GEMM checkpoint (qweight/qzeros/scales, quant_method awq) for transformers, vLLM, TGI"
    Options = CheckpointOptions
    default_format = "int4-g128"
    can_load = True

    options: CheckpointOptions

    # -- planning ------------------------------------------------------------------------
    def storable(self) -> str:
        return "4-bit int grids in groups with float16 scales (int4-g128, int4-g64, int4-g128-sym, ...)"

    def check_format(self, fmt: Format) -> str | None:
        if not isinstance(fmt, IntFormat):
            return f"an AWQ checkpoint holds integer grids, not {fmt.spec}"
        if fmt.options.bits != 4:
            return f"AWQ GEMM kernels read 4 bits, not {fmt.options.bits}"
        if fmt.options.scale_dtype != "float16":
            return f"AWQ scales are float16, not {fmt.options.scale_dtype}"
        if fmt.options.zero_dtype != "uint8":
            return "AWQ zero points are 4-bit integers, not float16 (-zf16)"
        if not fmt.options.group_size:
            return "AWQ kernels need a group size (per-channel int4 is not an AWQ layout)"
        return None

    def plan(self, source: Any, requested: Format | None, *, collects_importance: bool = False) -> QuantPlan:
        requested = requested or IntFormat(IntFormat.Options())
        reason = self.check_format(requested)
        if reason or not isinstance(requested, IntFormat):
            raise UsageError(f"exporter hf-awq cannot store {requested.spec}: {reason}; it stores {self.storable()}")

        def unfit(shape: tuple[int, int]) -> str | None:
            return f"{shape[0]} outputs are not a multiple of 8 (AWQ packs 8 outputs per word)" if shape[0] % 8 \
                else None

        plan, fmt = one_group_plan(source, requested, unfit)
        if not fmt.options.group_size:
            raise UsageError(f"exporter hf-awq: no group of at least 32 columns divides every linear of "
                             f"{source.path}; use the qf or gguf exporter")
        self.format = fmt
        return plan

    # -- writing -------------------------------------------------------------------------
    def begin(self, folder: Path, source: Any, plan: QuantPlan) -> None:
        self.folder = folder
        self.source = source
        self.writer = ShardedSafetensorsWriter(folder, self.options.shard_mb)
        self.quantized: list[str] = []

    def write(self, name: str, tensor: torch.Tensor | QuantizedWeight) -> None:
        if not isinstance(tensor, QuantizedWeight):
            self.writer.add(name, tensor)
            return
        prefix = name.removesuffix(".weight")
        for part, t in to_awq(tensor).items():
            self.writer.add(f"{prefix}.{part}", t)
        self.quantized.append(prefix)

    def quantization_config(self) -> dict[str, Any]:
        linears = {n for n, _ in self.source.linear_shapes().items()}
        kept = sorted({n.split(".")[-1] for n in linears if n not in self.quantized})
        return {"quant_method": "awq", "bits": 4, "group_size": self.format.options.group_size,
                "zero_point": True, "version": "gemm", "modules_to_not_convert": kept or None}

    def finish(self, manifest: dict[str, Any]) -> dict[str, Any]:
        files = self.writer.finish()
        qcfg = self.quantization_config()
        write_hf_config(self.source.path, self.folder, qcfg)
        legacy = {"zero_point": True, "q_group_size": qcfg["group_size"], "w_bit": 4, "version": "GEMM"}
        (self.folder / "quant_config.json").write_text(json.dumps(legacy, indent=2) + "\n")
        return {"files": files, "awq_linears": list(self.quantized)}

    def run_command(self, folder: Path) -> str | None:
        """transformers with its AWQ backend (``pip install gptqmodel``); docs/deploy.md: vLLM."""
        if is_moe_checkpoint(folder):  # transformers keeps a MoE's experts fused: it cannot take per-expert weights
            return gptqmodel_command(folder) + "  # needs: pip install gptqmodel (transformers cannot load MoE GPTQ/AWQ)"
        return transformers_command(folder) + "  # needs: pip install gptqmodel"

    def verify(self, folder: Path) -> None:
        manifest = read_manifest(folder)
        shapes = stored_shapes(folder, manifest.get("files") or [])
        for prefix in manifest.get("awq_linears", []):
            missing = [p for p in PARTS if f"{prefix}.{p}" not in shapes]
            if missing:
                raise ArtifactError(f"{prefix}.{missing[0]} is missing from {folder}")
            if shapes[f"{prefix}.qweight"][1] * 8 != shapes[f"{prefix}.scales"][1]:
                raise ArtifactError(f"{prefix}.qweight has shape {shapes[f'{prefix}.qweight']} for "
                                    f"{shapes[f'{prefix}.scales'][1]} outputs")

    # -- reading back ----------------------------------------------------------------------
    def load(self, folder: Path, device: torch.device, kernel: str | None = None,
             dtype: torch.dtype = torch.float32) -> nn.Module:
        return load_awq_checkpoint(folder, device=device, kernel=kernel, dtype=dtype)

    @classmethod
    def claims(cls, path: Path) -> bool:
        return quant_method_of(path) == "awq"


def load_awq_checkpoint(folder: Path, *, device: torch.device, kernel: str | None = None,
                        dtype: torch.dtype = torch.float32) -> nn.Module:
    """A model from an AWQ GEMM checkpoint folder (any writer's), quantized linears as
    QuantLinear with the asymmetric int4 format."""
    q = json.loads((Path(folder) / "config.json").read_text()).get("quantization_config") or {}
    if q.get("quant_method") != "awq" or str(q.get("version", "gemm")).lower() != "gemm" or q.get("bits", 4) != 4:
        raise ArtifactError(f"{folder} is not a 4-bit AWQ GEMM checkpoint: quantization_config is {q}")
    if not q.get("zero_point", True):
        raise ArtifactError(f"{folder}: AWQ without zero points is not read by qf; quantization_config is {q}")
    model, source = artifact_skeleton(Path(folder), dtype)
    fmt = IntFormat(IntFormat.Options(bits=4, group_size=int(q.get("group_size", 128)), sym=False))
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or not source.has_tensor(f"{name}.qweight"):
            continue
        parts = source.read([f"{name}.{p}" for p in PARTS])
        qw = from_awq({p: parts[f"{name}.{p}"] for p in PARTS}, fmt, (module.out_features, module.in_features),
                      source.storage_dtype)
        swap_in(model, name, qw.to(device), select_kernels(fmt, device, kernel))
    return load_float_parameters(model, source, device, dtype)

"""Exporter ``bnb-4bit``: the checkpoint transformers writes for a bitsandbytes 4-bit model, so
``AutoModelForCausalLM.from_pretrained(folder)`` loads it with bitsandbytes (CPU or CUDA).

Each quantized linear ``L`` is stored as bitsandbytes' ``Linear4bit`` serializes itself:

* ``L.weight`` — the packed codes, ``uint8 [out * in / 2, 1]`` (two codes a byte, the first in
  the high nibble, row-major);
* ``L.weight.absmax`` — ``float32 [out * in / blocksize]``, one per block (with double
  quantization: their ``uint8`` codes);
* ``L.weight.quant_map`` — the 16-entry code table (``float32``);
* with double quantization, ``L.weight.nested_absmax`` (``float32``, one per 256 blocks) and
  ``L.weight.nested_quant_map`` (the 256-entry dynamic map);
* ``L.weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``) — the JSON of ``quant_type``,
  ``blocksize``, ``dtype`` and ``shape`` (and ``nested_blocksize``, ``nested_dtype``,
  ``nested_offset`` with double quantization) as ``uint8`` bytes (bitsandbytes'
  ``pack_dict_to_tensor``).

``config.json`` gets transformers' own ``BitsAndBytesConfig(load_in_4bit=True, ...).to_dict()``
(``quant_method: bitsandbytes``, the quant type, ``bnb_4bit_use_double_quant``, the compute
dtype = the checkpoint's) with every linear kept in float (the output head, widths that are no
multiple of the block size) in ``llm_int8_skip_modules``, so transformers leaves those as
``nn.Linear``. One quant type and one double-quant setting per checkpoint (the config has one).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from quantfoundry import Exporter, Format, QuantizedWeight, QuantPlan
from quantfoundry.errors import ArtifactError, UsageError
from quantfoundry.toolkit import (
    PROMPT,
    CheckpointOptions,
    ShardedSafetensorsWriter,
    artifact_skeleton,
    load_float_parameters,
    python_command,
    quant_method_of,
    read_manifest,
    select_kernels,
    stored_shapes,
    swap_in,
    write_hf_config,
)
from torch import nn

from .formats import NESTED_BLOCK, BnB4Format, BnB4Options, FP4Format, NF4Format, code_table

PARTS = ("absmax", "quant_map")
NESTED_PARTS = ("nested_absmax", "nested_quant_map")


def quant_state_bytes(kind: str, blocksize: int, dtype: torch.dtype, shape: tuple[int, int],
                      nested_offset: float | None = None) -> torch.Tensor:
    """``quant_state.bitsandbytes__<kind>``: the JSON bitsandbytes' ``QuantState.as_dict(packed=True)``
    packs, as ``uint8`` (its keys in its order)."""
    state: dict[str, Any] = {"quant_type": kind, "blocksize": blocksize, "dtype": str(dtype).removeprefix("torch."),
                             "shape": list(shape)}
    if nested_offset is not None:
        state.update({"nested_blocksize": NESTED_BLOCK, "nested_dtype": "float32", "nested_offset": nested_offset})
    return torch.tensor(list(json.dumps(state).encode("utf-8")), dtype=torch.uint8)


class BnB4BitExporter(Exporter):
    name = "bnb-4bit"
    description = "bitsandbytes 4-bit checkpoint (nf4/fp4, quant_method bitsandbytes) for transformers"
    Options = CheckpointOptions
    default_format = "nf4"
    can_load = True

    options: CheckpointOptions

    # -- planning ------------------------------------------------------------------------
    def storable(self) -> str:
        return "nf4 or fp4 with any block size (e.g. nf4, nf4-b128, fp4)"

    def check_format(self, fmt: Format) -> str | None:
        if not isinstance(fmt, BnB4Format):
            return f"a bitsandbytes 4-bit checkpoint holds nf4 or fp4, not {fmt.spec}"
        return None

    def plan(self, source: Any, requested: Format | None, *, collects_importance: bool = False) -> QuantPlan:
        requested = requested or NF4Format()
        reason = self.check_format(requested)
        if reason:
            raise UsageError(f"exporter bnb-4bit cannot store {requested.spec}: {reason}; it stores {self.storable()}")
        if source.moe_layers:
            raise UsageError(f"{source.hf_class} is a mixture of experts: transformers keeps its experts fused and "
                             "bitsandbytes quantizes nn.Linear modules only, so no engine loads per-expert 4-bit "
                             "weights; use --exporter compressed-tensors, gguf or hf-gptq")
        return super().plan(source, requested, collects_importance=collects_importance)

    # -- writing -------------------------------------------------------------------------
    def begin(self, folder: Path, source: Any, plan: QuantPlan) -> None:
        self.folder, self.source, self.plan_ = folder, source, plan
        self.writer = ShardedSafetensorsWriter(folder, self.options.shard_mb)
        self.quantized: list[str] = []
        self.kinds: set[str] = set()
        self.double: set[bool] = set()

    def write(self, name: str, tensor: torch.Tensor | QuantizedWeight) -> None:
        if not isinstance(tensor, QuantizedWeight):
            self.writer.add(name, tensor)
            return
        fmt = tensor.format
        if not isinstance(fmt, BnB4Format):
            raise ArtifactError(f"{name} is {fmt.spec}; bnb-4bit stores nf4 or fp4")
        if tensor.perm is not None:
            raise ArtifactError(f"{name} has a column permutation (act-order); bitsandbytes stores none")
        self.kinds.add(fmt.kind)
        self.double.add(fmt.options.double_quant)
        self.writer.add(name, tensor.packed.reshape(-1, 1))
        offset = None
        if fmt.options.double_quant:
            tp = tensor.tensor_params
            self.writer.add(f"{name}.absmax", tensor.params["absmax"].reshape(-1))  # uint8 codes
            self.writer.add(f"{name}.nested_absmax", tp["nested_absmax"].float())
            self.writer.add(f"{name}.nested_quant_map", tp["nested_map"].float())
            offset = float(tp["offset"].item())
        else:
            self.writer.add(f"{name}.absmax", tensor.params["absmax"].float().reshape(-1))
        self.writer.add(f"{name}.quant_map", code_table(fmt.kind))
        self.writer.add(f"{name}.quant_state.bitsandbytes__{fmt.kind}",
                        quant_state_bytes(fmt.kind, fmt.options.blocksize, tensor.dtype, tensor.shape, offset))
        self.quantized.append(name.removesuffix(".weight"))

    def quantization_config(self) -> dict[str, Any]:
        from transformers import BitsAndBytesConfig

        if len(self.kinds) > 1:
            raise ArtifactError(f"a bitsandbytes checkpoint has one quant type, got {sorted(self.kinds)}")
        if len(self.double) > 1:
            raise ArtifactError("a bitsandbytes checkpoint uses double quantization for all its linears or none")
        kept = sorted(self.plan_.kept_float())
        dtype = str(self.source.storage_dtype).removeprefix("torch.")
        cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=next(iter(self.kinds), "nf4"),
                                 bnb_4bit_use_double_quant=next(iter(self.double), False),
                                 bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=kept)
        return cfg.to_dict()

    def finish(self, manifest: dict[str, Any]) -> dict[str, Any]:
        files = self.writer.finish()
        write_hf_config(self.source.path, self.folder, self.quantization_config())
        return {"files": files, "bnb_linears": list(self.quantized)}

    def verify(self, folder: Path) -> None:
        manifest = read_manifest(folder)
        shapes = stored_shapes(folder, manifest.get("files") or [])
        for prefix in manifest.get("bnb_linears", []):
            parts = PARTS + (NESTED_PARTS if f"{prefix}.weight.nested_absmax" in shapes else ())
            for key in (f"{prefix}.weight", *(f"{prefix}.weight.{p}" for p in parts)):
                if key not in shapes:
                    raise ArtifactError(f"{key} is missing from {folder}")

    def run_command(self, folder: Path) -> str | None:
        """transformers with bitsandbytes (``pip install bitsandbytes``), on the GPU when there is one."""
        f, p = json.dumps(str(folder)), json.dumps(PROMPT)
        return python_command(
            "import torch, transformers as t; "
            f"m = t.AutoModelForCausalLM.from_pretrained({f}, device_map={json.dumps('auto')}); "
            f"tok = t.AutoTokenizer.from_pretrained({f}); "
            f"print(tok.decode(m.generate(**tok({p}, return_tensors={json.dumps('pt')}).to(m.device), "
            "max_new_tokens=32)[0]))") + "  # needs: pip install bitsandbytes"

    # -- reading back ----------------------------------------------------------------------
    def load(self, folder: Path, device: torch.device, kernel: str | None = None,
             dtype: torch.dtype = torch.float32) -> nn.Module:
        return load_bnb_checkpoint(folder, device=device, kernel=kernel, dtype=dtype)

    @classmethod
    def claims(cls, path: Path) -> bool:
        return quant_method_of(path) == "bitsandbytes"


def load_bnb_checkpoint(folder: Path, *, device: torch.device, kernel: str | None = None,
                        dtype: torch.dtype = torch.float32) -> nn.Module:
    """A model from a bitsandbytes 4-bit checkpoint (ours, or one transformers wrote, with or
    without double quantization), linears as QuantLinear."""
    model, source = artifact_skeleton(Path(folder), dtype)
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        keys = [k for k in (f"{name}.weight.quant_state.bitsandbytes__nf4", f"{name}.weight.quant_state.bitsandbytes__fp4")
                if source.has_tensor(k)]
        if not keys:
            continue
        double = source.has_tensor(f"{name}.weight.nested_absmax")
        parts = [f"{name}.weight", f"{name}.weight.absmax", f"{name}.weight.quant_map", keys[0]]
        stored = source.read(parts + ([f"{name}.weight.{p}" for p in NESTED_PARTS] if double else []))
        state = json.loads(bytes(stored[keys[0]].tolist()).decode("utf-8"))
        cls = NF4Format if state["quant_type"] == "nf4" else FP4Format
        fmt = cls(BnB4Options(blocksize=int(state["blocksize"]), double_quant=double))
        shape = (module.out_features, module.in_features)
        if tuple(state["shape"]) != shape:
            raise ArtifactError(f"{folder}: {name} stores shape {state['shape']}, the model has {list(shape)}")
        if not torch.equal(stored[f"{name}.weight.quant_map"].float(), code_table(fmt.kind)):
            raise ArtifactError(f"{folder}: {name} stores a {fmt.kind} code table that is not bitsandbytes' own")
        absmax = stored[f"{name}.weight.absmax"].view(shape[0], -1)
        tensor_params = {}
        if double:
            if int(state.get("nested_blocksize", 0)) != NESTED_BLOCK:
                raise ArtifactError(f"{folder}: {name} has nested_blocksize {state.get('nested_blocksize')}; "
                                    f"bitsandbytes writes {NESTED_BLOCK}")
            tensor_params = {"offset": torch.tensor([float(state["nested_offset"])], dtype=torch.float32),
                             "nested_absmax": stored[f"{name}.weight.nested_absmax"].float(),
                             "nested_map": stored[f"{name}.weight.nested_quant_map"].float()}
            absmax = absmax.to(torch.uint8)
        else:
            absmax = absmax.float()
        qw = QuantizedWeight(fmt, shape, getattr(torch, state["dtype"]), stored[f"{name}.weight"].reshape(-1),
                             {"absmax": absmax}, tensor_params=tensor_params)
        swap_in(model, name, qw.to(device), select_kernels(fmt, device, kernel))
    return load_float_parameters(model, source, device, dtype)

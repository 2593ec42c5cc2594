"""Built-in exporter ``qf``: safetensors holding codes + grid parameters, reloaded bit-identically.

Layout of the artifact folder:

* ``model.safetensors`` (or ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``
  above ``shard_mb``, written tensor by tensor so the artifact is never held in memory): float tensors under their own names, in the checkpoint's dtype; each
  quantized weight ``W`` as ``W.qf.packed`` (uint8 bitstream), ``W.qf.<param>`` (grid
  parameters in their storage dtype), ``W.qf.tensor.<param>`` (per-tensor parameters),
  ``W.qf.perm`` (int32) when it has one and ``W.qf.input_scale`` (float32) when its input has
  a static activation scale; the manifest's tensor table holds the input scheme
  (``input_quant``), so W8A8 models reload with the same simulated activations;
* ``config.json`` with ``quantization_config = {"quant_method": "quantfoundry", ...}``, and the
  tokenizer / generation files copied from the source;
* ``quantfoundry.json``: the manifest, whose ``tensors`` table names each tensor's format.

``quantfoundry.load(folder)`` / ``qf load`` rebuild the model with :class:`QuantLinear` modules.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ArtifactError
from ..files import read_manifest
from ..formats import format_from_json
from ..hookspecs import hookimpl
from ..roles.activation import ActQuant
from ..roles.exporter import Exporter
from ..roles.format import QuantizedWeight
from ..roles.plan import QuantPlan
from ..roles.weight_transform import transform_from_stored
from ..toolkit.checkpoint import (
    CheckpointOptions,
    artifact_skeleton,
    attach_kv_scales,
    load_float_parameters,
    write_hf_config,
)
from ..toolkit.kernels import select_kernels, swap_in
from ..toolkit.safetensors_stream import ShardedSafetensorsWriter
from .int_format import IntFormat

QF = ".qf."


class QFExporter(Exporter):
    name = "qf"
    description = "QuantFoundry's own safetensors checkpoint (codes + grid parameters), reloadable by qf load"
    Options = CheckpointOptions
    default_format = "int4-g128"
    stores_permutation = True
    stores_transforms = frozenset({"rht"})
    can_load = True

    options: CheckpointOptions

    def check_activations(self, act: ActQuant, fmt: Any) -> str | None:
        return None  # any input scheme, with any weight format: qf's kernels simulate it

    def check_kv_cache(self, act: ActQuant) -> str | None:
        return None  # k_scale / v_scale under their names, the scheme in the manifest

    def mix_candidates(self, source: Any, plan: QuantPlan) -> dict[str, tuple[Any, ...]]:
        """The artifact names each tensor's format, so any mix reloads: an integer grid may take
        2 … 8 bits (the planned grid's group size and symmetry) or stay in float; another format
        may stay as planned or in float."""
        out: dict[str, tuple[Any, ...]] = {}
        for name, entry in plan.quantized().items():
            fmt = entry.format
            if fmt is None or source.block_index(name) is None:
                continue
            if isinstance(fmt, IntFormat):
                grids = [IntFormat(replace(fmt.options, bits=b)) for b in (2, 3, 4, 5, 6, 8)]
                out[name] = (*(g for g in grids if g.check_shape(entry.shape) is None), None)
            else:
                out[name] = (fmt, None)
        return out

    def begin(self, folder: Path, source: Any, plan: QuantPlan) -> None:
        self.folder = folder
        self.source = source
        self.writer = ShardedSafetensorsWriter(folder, self.options.shard_mb)
        self.tensors: dict[str, dict[str, Any]] = {}
        self.kv_cache = plan.kv_cache

    def write(self, name: str, tensor: torch.Tensor | QuantizedWeight) -> None:
        if name in self.writer.names or f"{name}{QF}packed" in self.writer.names:
            raise ArtifactError(f"tensor {name} written twice to the qf artifact")
        if isinstance(tensor, QuantizedWeight):
            entries = {f"{name}{QF}packed": tensor.packed}
            entries.update({f"{name}{QF}{k}": v for k, v in tensor.params.items()})
            entries.update({f"{name}{QF}tensor.{k}": v for k, v in tensor.tensor_params.items()})
            if tensor.perm is not None:
                entries[f"{name}{QF}perm"] = tensor.perm.to(torch.int32)
            if tensor.input_scale is not None:
                entries[f"{name}{QF}input_scale"] = tensor.input_scale
            for i, t in enumerate(tensor.transforms):
                entries.update({f"{name}{QF}transform{i}.{k}": v for k, v in t.tensors().items()})
            self.tensors[name] = {
                "format": tensor.format.to_json(), "shape": list(tensor.shape),
                "dtype": str(tensor.dtype).removeprefix("torch."), "params": sorted(tensor.params),
                "perm": tensor.perm is not None, "tensor_params": sorted(tensor.tensor_params),
            }
            if tensor.transforms:
                self.tensors[name]["transforms"] = [{"info": t.to_json(), "tensors": sorted(t.tensors())}
                                                    for t in tensor.transforms]
            if tensor.input_quant is not None:
                self.tensors[name]["input_quant"] = tensor.input_quant.to_json()
        else:
            entries = {name: tensor}
        for key, value in entries.items():
            self.writer.add(key, value)

    def finish(self, manifest: dict[str, Any]) -> dict[str, Any]:
        files = self.writer.finish()
        write_hf_config(self.source.path, self.folder, {
            "quant_method": "quantfoundry",
            "note": "QuantFoundry checkpoint: load it with quantfoundry.load() or `qf load`",
        })
        out: dict[str, Any] = {"tensors": self.tensors, "files": files}
        if self.kv_cache is not None:
            out["kv_cache"] = self.kv_cache.to_json()
        return out

    def run_command(self, folder: Path) -> str | None:
        """quantfoundry itself: reload the artifact with our kernels and generate."""
        from ..toolkit.checkpoint import PROMPT, python_command

        f, p = json.dumps(str(folder)), json.dumps(PROMPT)
        return python_command(f"import quantfoundry as qf, transformers as t; m = qf.load({f}); "
                              f"tok = t.AutoTokenizer.from_pretrained({f}); "
                              f"print(tok.decode(m.generate(**tok({p}, return_tensors={json.dumps('pt')}), "
                              "max_new_tokens=32)[0]))")

    def verify(self, folder: Path) -> None:
        from safetensors import safe_open

        manifest = read_manifest(folder)
        files = manifest.get("files") or []
        seen: set[str] = set()
        for name in files:
            try:
                with safe_open(str(folder / name), framework="pt") as f:
                    seen.update(f.keys())
            except Exception as exc:
                raise ArtifactError(f"{folder / name} cannot be read back ({exc}); the write failed") from None
        for tensor in manifest.get("tensors", {}):
            if f"{tensor}{QF}packed" not in seen:
                raise ArtifactError(f"{tensor} is missing from the written files of {folder}")

    def load(self, folder: Path, device: torch.device, kernel: str | None = None,
             dtype: torch.dtype = torch.float32) -> nn.Module:
        return load_qf_artifact(folder, device=device, kernel=kernel, dtype=dtype)


def load_qf_artifact(folder: Path, *, device: torch.device, kernel: str | None = None,
                     dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild a model written by the ``qf`` exporter, quantized linears as QuantLinear."""
    manifest = read_manifest(folder)
    model, source = artifact_skeleton(folder, dtype)
    tensors: dict[str, dict[str, Any]] = manifest.get("tensors", {})
    for name, info in tensors.items():
        tparams = info.get("tensor_params", [])
        keys = [f"{name}{QF}packed", *[f"{name}{QF}{p}" for p in info["params"]],
                *[f"{name}{QF}tensor.{p}" for p in tparams]]
        if info.get("perm"):
            keys.append(f"{name}{QF}perm")
        act = ActQuant.from_json(info["input_quant"]) if info.get("input_quant") else None
        if act is not None and not act.dynamic:
            keys.append(f"{name}{QF}input_scale")
        transforms = info.get("transforms", [])
        keys += [f"{name}{QF}transform{i}.{k}" for i, t in enumerate(transforms) for k in t["tensors"]]
        stored = source.read(keys)
        fmt = format_from_json(info["format"])
        qw = QuantizedWeight(
            fmt, tuple(info["shape"]), getattr(torch, info["dtype"]), stored[f"{name}{QF}packed"],
            {p: stored[f"{name}{QF}{p}"] for p in info["params"]},
            stored[f"{name}{QF}perm"].to(torch.int64) if info.get("perm") else None,
            tensor_params={p: stored[f"{name}{QF}tensor.{p}"] for p in tparams}, input_quant=act,
            input_scale=stored.get(f"{name}{QF}input_scale"),
            transforms=tuple(transform_from_stored(t["info"], {k: stored[f"{name}{QF}transform{i}.{k}"]
                                                               for k in t["tensors"]})
                             for i, t in enumerate(transforms)),
        ).to(device)
        module_name = name.removesuffix(".weight")
        swap_in(model, module_name, qw, select_kernels(fmt, device, kernel))
    model = load_float_parameters(model, source, device, dtype)
    if manifest.get("kv_cache"):
        attach_kv_scales(model, source, ActQuant.from_json(manifest["kv_cache"]), device)
    return model


@hookimpl
def qf_register_exporters(register):
    register(QFExporter)

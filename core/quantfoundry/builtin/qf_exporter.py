"""Built-in exporter ``qf``: safetensors holding codes + grid parameters, reloaded bit-identically.

Layout of the artifact folder:

* ``model.safetensors`` (or ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``
  above ``shard_mb``, written tensor by tensor so the artifact is never held in memory): float tensors under their own names, in the checkpoint's dtype; each
  quantized weight ``W`` as ``W.qf.packed`` (uint8 bitstream), ``W.qf.<param>`` (grid
  parameters in their storage dtype) and ``W.qf.perm`` (int32) when it has one;
* ``config.json`` with ``quantization_config = {"quant_method": "quantfoundry", ...}``, and the
  tokenizer / generation files copied from the source;
* ``quantfoundry.json``: the manifest, whose ``tensors`` table names each tensor's format.

``quantfoundry.load(folder)`` / ``qf load`` rebuild the model with :class:`QuantLinear` modules.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ArtifactError
from ..hookspecs import hookimpl
from ..options import Options
from ..roles.exporter import Exporter
from ..roles.format import QuantizedWeight
from ..roles.plan import QuantPlan
from ..safetensors_stream import ShardedSafetensorsWriter

_COPY_GLOBS = ("tokenizer*", "special_tokens_map.json", "generation_config.json", "*.jinja", "vocab.*",
               "merges.txt", "added_tokens.json", "*.tiktoken", "chat_template.json")
QF = ".qf."


@dataclass(frozen=True, kw_only=True)
class QFExporterOptions(Options):
    shard_mb: int = field(default=4096, metadata={
        "help": "start a new safetensors file once the current one holds this many MB"})

    def __post_init__(self) -> None:
        if self.shard_mb < 1:
            raise ValueError(f"shard_mb must be >= 1, got {self.shard_mb}")


class QFExporter(Exporter):
    name = "qf"
    description = "QuantFoundry's own safetensors checkpoint (codes + grid parameters), reloadable by qf load"
    Options = QFExporterOptions
    default_format = "int4-g128"
    stores_permutation = True

    options: QFExporterOptions

    def begin(self, folder: Path, source: Any, plan: QuantPlan) -> None:
        self.folder = folder
        self.source = source
        self.writer = ShardedSafetensorsWriter(folder, self.options.shard_mb)
        self.tensors: dict[str, dict[str, Any]] = {}

    def write(self, name: str, tensor: torch.Tensor | QuantizedWeight) -> None:
        if name in self.writer.names or f"{name}{QF}packed" in self.writer.names:
            raise ArtifactError(f"tensor {name} written twice to the qf artifact")
        if isinstance(tensor, QuantizedWeight):
            entries = {f"{name}{QF}packed": tensor.packed}
            entries.update({f"{name}{QF}{k}": v for k, v in tensor.params.items()})
            if tensor.perm is not None:
                entries[f"{name}{QF}perm"] = tensor.perm.to(torch.int32)
            self.tensors[name] = {
                "format": tensor.format.to_json(), "shape": list(tensor.shape),
                "dtype": str(tensor.dtype).removeprefix("torch."), "params": sorted(tensor.params),
                "perm": tensor.perm is not None,
            }
        else:
            entries = {name: tensor}
        for key, value in entries.items():
            self.writer.add(key, value)

    def finish(self, manifest: dict[str, Any]) -> dict[str, Any]:
        files = self.writer.finish()
        config = json.loads((self.source.path / "config.json").read_text())
        config["quantization_config"] = {
            "quant_method": "quantfoundry",
            "note": "QuantFoundry checkpoint: load it with quantfoundry.load() or `qf load`",
        }
        (self.folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copy_tokenizer_files(self.source.path, self.folder)
        return {"tensors": self.tensors, "files": files}

    def verify(self, folder: Path) -> None:
        from safetensors import safe_open

        from ..pipeline.manifest import read_manifest

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


def copy_tokenizer_files(source: Path, folder: Path) -> None:
    """Copy the tokenizer, chat template and generation config files of a model folder."""
    for pattern in _COPY_GLOBS:
        for f in source.glob(pattern):
            if f.is_file() and not (folder / f.name).exists():
                shutil.copy2(f, folder / f.name)


def stored_shapes(folder: Path, files: list[str]) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in the written safetensors ``files`` (a file that cannot be read
    back is an :class:`ArtifactError`: the write failed)."""
    from safetensors import safe_open

    from ..errors import ArtifactError

    shapes: dict[str, tuple[int, ...]] = {}
    for name in files:
        try:
            with safe_open(str(folder / name), framework="pt") as f:
                shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        except Exception as exc:
            raise ArtifactError(f"{folder / name} cannot be read back ({exc}); the write failed") from None
    return shapes


def quant_method_of(path: Path) -> str | None:
    """``quantization_config.quant_method`` of a Hugging Face folder's ``config.json``, if any."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    return (json.loads(cfg.read_text()).get("quantization_config") or {}).get("quant_method")


def write_hf_config(source: Path, folder: Path, quantization_config: dict[str, Any]) -> None:
    """The source's ``config.json`` with ``quantization_config``, and its tokenizer files."""
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    copy_tokenizer_files(source, folder)


def load_qf_artifact(folder: Path, *, device: torch.device, kernel: str | None = None,
                     dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild a model written by the ``qf`` exporter, quantized linears as QuantLinear."""
    from ..formats import format_from_json
    from ..pipeline.kernels import select_kernel, swap_in
    from ..pipeline.manifest import read_manifest

    manifest = read_manifest(folder)
    model, source = artifact_skeleton(folder, dtype)
    tensors: dict[str, dict[str, Any]] = manifest.get("tensors", {})
    for name, info in tensors.items():
        keys = [f"{name}{QF}packed", *[f"{name}{QF}{p}" for p in info["params"]]]
        if info.get("perm"):
            keys.append(f"{name}{QF}perm")
        stored = source.read(keys)
        fmt = format_from_json(info["format"])
        qw = QuantizedWeight(
            fmt, tuple(info["shape"]), getattr(torch, info["dtype"]), stored[f"{name}{QF}packed"],
            {p: stored[f"{name}{QF}{p}"] for p in info["params"]},
            stored[f"{name}{QF}perm"].to(torch.int64) if info.get("perm") else None,
        ).to(device)
        module_name = name.removesuffix(".weight")
        swap_in(model, module_name, qw, select_kernel(fmt, device, kernel))
    return load_float_parameters(model, source, device, dtype)


def artifact_skeleton(folder: Path, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """An empty (meta) model from an artifact folder's ``config.json`` (its
    ``quantization_config`` ignored) and a :class:`ModelSource` over its safetensors files."""
    from transformers import AutoConfig

    from ..pipeline.source import ModelSource, _weight_files, find_architecture

    config = AutoConfig.from_pretrained(str(folder))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    arch = find_architecture(config.architectures[0])
    weight_map, _ = _weight_files(folder, allow_pickle=False)
    source = ModelSource(folder, config, arch, weight_map)
    return source.skeleton(dtype), source


def load_float_parameters(model: nn.Module, source: Any, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Fill every parameter still on the meta device from the artifact (tied names share one)."""
    from ..pipeline.materialize import set_parameter, tied_source

    loaded: dict[str, nn.Parameter] = {}
    for pname, p in list(model.named_parameters(remove_duplicate=False)):
        if p.device.type != "meta":
            continue
        key = pname if source.has_tensor(pname) else tied_source(model, source, pname)
        if key is None:
            raise ArtifactError(f"{pname} is missing from {source.path}; the artifact is incomplete: re-run `qf run`")
        if key not in loaded:  # tied names share one Parameter
            loaded[key] = nn.Parameter(source.read([key])[key].to(device=device, dtype=dtype), requires_grad=False)
        set_parameter(model, pname, loaded[key])
    return model.to(device).eval()


@hookimpl
def qf_register_exporters(register):
    register(QFExporter)

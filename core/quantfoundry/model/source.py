"""The source model: where its files are, its architecture map, lazy per-block weight reads.

Weights are read from the safetensors shards one tensor at a time, so the pipeline never
needs the whole model in memory; the model itself is built as a skeleton whose parameters
live on the ``meta`` device until a block is materialized.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import (
    ModelLoadError,
    NonFiniteWeightsError,
    UnsupportedArchitectureError,
)
from ..memory import trim_memory
from ..roles.architecture import Architecture, concrete_groups
from .experts import expert_lists, unfuse_experts

_STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def find_architecture(hf_class: str) -> Architecture:
    """The registered architecture map that covers ``hf_class`` (``LlamaForCausalLM``)."""
    from ..plugins import get_plugin_manager

    registry = get_plugin_manager().registry("architecture")
    claims: dict[str, Architecture] = {}
    for entry in registry.entries.values():
        arch: Architecture = entry.component
        for cls in arch.hf_architectures:
            if cls in claims and claims[cls] is not arch:
                raise UnsupportedArchitectureError(
                    f"{cls} is claimed by architectures {claims[cls].name!r} and {arch.name!r}; "
                    "block one of their plugins")
            claims[cls] = arch
    if hf_class not in claims:
        raise UnsupportedArchitectureError(
            f"architecture {hf_class} is not supported; supported: {', '.join(sorted(claims))}; "
            "register a map with the qf_register_architectures hook (docs/writing-a-plugin.md)")
    return claims[hf_class]


@dataclass
class ModelSource:
    """A resolved source model: folder, config, architecture map and weight files."""

    path: Path
    config: Any
    architecture: Architecture
    weight_map: dict[str, Path]
    pickle: bool = False
    trust_remote_code: bool = False
    #: the model's name (a hub id's repository name, else the folder's name): GGUF's
    #: ``general.name``, default output folders
    name: str = ""
    _pickled: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.name:
            self.name = model_name(self.path)

    # -- description ---------------------------------------------------------------------
    @property
    def hf_class(self) -> str:
        return (getattr(self.config, "architectures", None) or ["?"])[0]

    @property
    def num_layers(self) -> int:
        return int(self.config.get_text_config().num_hidden_layers)

    @property
    def context_length(self) -> int:
        return int(getattr(self.config.get_text_config(), "max_position_embeddings", 2048) or 2048)

    @cached_property
    def storage_dtype(self) -> torch.dtype:
        """The dtype the checkpoint's float weights are stored in (most common one)."""
        counts: dict[torch.dtype, int] = {}
        for dtype, shape in self.tensor_info.values():
            if dtype.is_floating_point:
                counts[dtype] = counts.get(dtype, 0) + int(torch.Size(shape).numel())
        return max(counts, key=counts.__getitem__) if counts else torch.float32

    @cached_property
    def tensor_info(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Name → (dtype, shape) of every stored tensor, read from file headers only."""
        if self.pickle:
            return {k: (v.dtype, tuple(v.shape)) for k, v in self._load_pickles().items()}
        info: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for file in sorted(set(self.weight_map.values())):
            with open_weights(file) as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    info[key] = (_dtype_of(sl.get_dtype()), tuple(sl.get_shape()))
        return info

    @cached_property
    def sha256(self) -> str:
        """SHA-256 over the weight files' bytes, in name order (the manifest's model hash)."""
        h = hashlib.sha256()
        for file in sorted(set(self.weight_map.values())):
            with open(file, "rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
        return h.hexdigest()

    def layer_prefix(self, index: int) -> str:
        return f"{self.architecture.layers}.{index}"

    def block_index(self, name: str) -> int | None:
        m = re.match(re.escape(self.architecture.layers) + r"\.(\d+)\.", name)
        return int(m.group(1)) if m else None

    @cached_property
    def _skeleton_facts(self) -> tuple[dict[str, tuple[int, int]], frozenset[str], int, list[str]]:
        model = self.skeleton()
        linears = {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        readers = []
        for index, layer in enumerate(model.get_submodule(self.architecture.layers)):
            modules = [n for n, _ in layer.named_modules()]
            for pattern in self.architecture.groups:
                for group in concrete_groups(pattern, modules):
                    readers += [f"{self.layer_prefix(index)}.{r}" for r in group.readers if r in modules]
        return linears, frozenset(n for n, _ in model.named_parameters(remove_duplicate=False)), \
            len(expert_lists(model)), sorted(set(readers))

    @property
    def moe_layers(self) -> int:
        """The model's mixture-of-experts layers (0 for a dense model)."""
        return self._skeleton_facts[2]

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """Module name → ``(out_features, in_features)`` of every ``nn.Linear`` in the model."""
        return dict(self._skeleton_facts[0])

    def parameter_names(self) -> frozenset[str]:
        """Every parameter name of the model (tied names included)."""
        return self._skeleton_facts[1]

    def is_block_linear(self, name: str) -> bool:
        """True for a linear of a decoder block that the architecture map lists."""
        idx = self.block_index(name)
        if idx is None:
            return False
        rel = name[len(self.layer_prefix(idx)) + 1:]
        return any(self.architecture.match(p, [rel]) for p in self.architecture.linears)

    def float_readers(self) -> list[str]:
        """Full names of the modules of every block that the map's input groups name as float
        readers (a MoE layer's router, a shared expert's gate): never quantized, and an
        exporter whose engine would otherwise expect them quantized lists them as ignored."""
        return list(self._skeleton_facts[3])

    def float_reason(self, name: str) -> str:
        """Why the linear ``name``, not a block linear of the map, stays in float."""
        if self.block_index(name) is None:
            return "outside the decoder blocks (kept in float)"
        return f"not a linear of the {self.architecture.name} map (a router or gate: kept in float)"

    # -- loading ---------------------------------------------------------------------------
    def skeleton(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """The model with every parameter on the ``meta`` device (buffers are real)."""
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(
                self.config, trust_remote_code=self.trust_remote_code, dtype=dtype)
        arch = self.architecture
        unfuse_experts(model, arch.expert_linears, arch.module_aliases)  # a MoE's experts as linears
        return model.eval()

    def _load_pickles(self) -> dict[str, torch.Tensor]:
        if self._pickled is None:
            state: dict[str, torch.Tensor] = {}
            for file in sorted(set(self.weight_map.values())):
                state.update(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
            self._pickled = state
        return self._pickled

    def has_tensor(self, name: str) -> bool:
        return name in self.weight_map

    def read(self, names: list[str], *, check_finite: bool = False) -> dict[str, torch.Tensor]:
        """Read tensors by name from the checkpoint (a copy each; files are not kept open)."""
        return dict(self.iter_read(names, check_finite=check_finite))

    def iter_read(self, names: list[str], *, check_finite: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` one at a time, opening each file once (bounded memory);
        with ``check_finite``, a float tensor holding NaN/Inf raises :class:`NonFiniteWeightsError`."""
        for name, t in self._iter_read(names):
            if check_finite:
                self._refuse_non_finite(name, t)
            yield name, t

    def _iter_read(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        if self.pickle:
            state = self._load_pickles()
            for n in names:
                yield n, state[n].clone()
            return
        by_file: dict[Path, list[str]] = {}
        for n in names:
            if n not in self.weight_map:
                raise ModelLoadError(f"tensor {n} is missing from the checkpoint in {self.path}")
            by_file.setdefault(self.weight_map[n], []).append(n)
        for file, keys in by_file.items():
            with open_weights(file) as f:
                for k in keys:
                    yield k, f.get_tensor(k).clone()

    def check_finite(self, names: list[str] | None = None) -> None:
        """Refuse weights with NaN/Inf (streamed, one tensor at a time): every float tensor, or
        those of ``names``. (A run checks the decoder blocks' tensors as it reads them to
        quantize, and only the rest up front: one read of the checkpoint instead of two.)"""
        if names is None:
            names = [name for name, (dtype, _shape) in self.tensor_info.items() if dtype.is_floating_point]
        for _name, t in self.iter_read(names, check_finite=True):
            del t
        trim_memory()

    def _refuse_non_finite(self, name: str, t: torch.Tensor) -> None:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise NonFiniteWeightsError(
                f"weight {name} of {self.path} holds {bad} NaN/Inf value(s); the checkpoint is broken: "
                "re-export it from a good training state")

    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(self.path), trust_remote_code=self.trust_remote_code)
        except Exception as exc:
            raise ModelLoadError(f"cannot load the tokenizer of {self.path}: {exc}".splitlines()[0]) from None


@contextmanager
def open_weights(file: Path) -> Iterator[Any]:
    """``safetensors.safe_open`` of a checkpoint file; a missing, truncated or damaged file is one
    :class:`ModelLoadError` naming the file and the fix."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            yield f
    except FileNotFoundError:
        raise ModelLoadError(f"{file} is missing (the checkpoint's index names it); download the model "
                             "again") from None
    except (SafetensorError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{file} is damaged or truncated ({first}); download it again") from None


def read_json(file: Path) -> Any:
    """A JSON file of a model folder; invalid JSON is one :class:`ModelLoadError` naming the file."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{file} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
                             "fix it or download it again") from None
    except UnicodeDecodeError:
        raise ModelLoadError(f"{file} is not UTF-8 text; fix it or download it again") from None


def _dtype_of(name: str) -> torch.dtype:
    table = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
    return table.get(name, torch.float32)


def _local_folder(model: str | Path, revision: str | None) -> Path:
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelLoadError(f"{model} is a file; pass the model's folder (with config.json)")
    text = str(model)
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise ModelLoadError(f"model folder {model} does not exist; pass a local folder or a hub id (org/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(
            text, revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.bin", "*.tiktoken"]))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"cannot fetch {model} from the Hugging Face Hub ({first}); "
            "check the id and your network, or pass a local folder") from None


def load_tokenizer(model: str | Path, *, trust_remote_code: bool = False, revision: str | None = None) -> Any:
    """A model's tokenizer alone (a local folder, or only the tokenizer files of a hub id): no
    weight is read or downloaded."""
    from transformers import AutoTokenizer

    path = Path(model).expanduser()
    if not path.is_dir():
        text = str(model)
        if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
            raise ModelLoadError(f"model folder {model} does not exist; pass a local folder or a hub id (org/name)")
    try:
        return AutoTokenizer.from_pretrained(str(path) if path.is_dir() else str(model), revision=revision,
                                             trust_remote_code=trust_remote_code)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load the tokenizer of {model}: {first}") from None


def model_name(model: str | Path) -> str:
    """A model's short name: a hub id's repository name (``org/Name`` → ``Name``), else the
    resolved folder's name (the embedded default model's folder is ``pycode-7m``)."""
    path = Path(model).expanduser()
    if not path.exists() and str(model).count("/") == 1 and not str(model).startswith((".", "/", "~")):
        return str(model).split("/")[1]
    return path.resolve().name


def resolve_model(
    model: str | Path, *, allow_pickle: bool = False, trust_remote_code: bool = False,
    revision: str | None = None, check_weights: bool = True,
) -> ModelSource:
    """Resolve a folder or hub id to a :class:`ModelSource`, applying every guard.

    Refuses: a missing folder or config; an already quantized checkpoint; an architecture
    with no registered map; pickled ``.bin`` weights unless ``allow_pickle``; NaN/Inf weights.
    """
    from ..deploy.merge import adapter_hint, is_adapter
    from ..deploy.requantize import refuse

    local = Path(model).expanduser()
    if local.is_dir() and is_adapter(local):
        raise ModelLoadError(adapter_hint(local))
    if local.exists():
        refuse(local)  # a GGUF file, a quantized checkpoint, a qf artifact: the float source is wanted
    folder = _local_folder(model, revision)
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} has no config.json; pass a Hugging Face model folder")
    refuse(folder)
    raw = read_json(folder / "config.json")
    archs = raw.get("architectures") or []
    if not archs:
        raise ModelLoadError(f"{folder}/config.json lists no 'architectures'; add e.g. [\"LlamaForCausalLM\"]")
    architecture = find_architecture(archs[0])
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = "; pass --trust-remote-code if you trust its code" if "trust_remote_code" in msg else ""
        raise ModelLoadError(f"cannot read {folder}/config.json: {msg}{hint}") from None
    weight_map, is_pickle = weight_files(folder, allow_pickle)
    source = ModelSource(folder, config, architecture, weight_map, pickle=is_pickle,
                         trust_remote_code=trust_remote_code, name=model_name(model))
    if check_weights:
        source.check_finite()
    return source


def weight_files(folder: Path, allow_pickle: bool) -> tuple[dict[str, Path], bool]:
    """Tensor name → file of a model folder's weights (safetensors, sharded or not; pickled
    ``.bin`` files only with ``allow_pickle``), and whether they are pickles."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        wm = read_json(index).get("weight_map") or {}
        return {k: folder / v for k, v in wm.items()}, False
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        out: dict[str, Path] = {}
        for s in shards:
            with open_weights(s) as f:
                for k in f.keys():
                    out[k] = s
        return out, False
    pickles = sorted(folder.glob("pytorch_model*.bin"))
    if pickles:
        if not allow_pickle:
            raise ModelLoadError(
                f"{folder} holds only pickled .bin weights, which can run arbitrary code when loaded; "
                "convert them to safetensors, or pass --allow-pickle if you trust the file")
        bin_index = folder / "pytorch_model.bin.index.json"
        if bin_index.is_file():
            wm = read_json(bin_index).get("weight_map") or {}
            return {k: folder / v for k, v in wm.items()}, True
        out = {}
        for p in pickles:
            for k in torch.load(p, map_location="meta", weights_only=True):
                out[k] = p
        return out, True
    raise ModelLoadError(f"{folder} has no *.safetensors weights; pass a folder with model.safetensors")

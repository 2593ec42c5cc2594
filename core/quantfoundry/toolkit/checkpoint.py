"""Hugging Face checkpoint helpers for exporters: the config with a ``quantization_config``,
tokenizer files, shapes read back from written safetensors, reloading an artifact's float
tensors, and plans for layouts with one group size (GPTQ's and AWQ's ``quantization_config``
have a single ``group_size``)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..builtin.int_format import MIN_FALLBACK_GROUP, IntFormat
from ..errors import ArtifactError
from ..model.materialize import set_buffer, set_parameter, tied_source
from ..model.source import ModelSource, find_architecture, weight_files
from ..options import Options
from ..roles.plan import QuantPlan, TensorPlan


@dataclass(frozen=True, kw_only=True)
class CheckpointOptions(Options):
    """Options of exporters that write sharded safetensors checkpoints (subclass to add more)."""

    shard_mb: int = field(default=4096, metadata={
        "help": "start a new safetensors file once the current one holds this many MB"})

    def __post_init__(self) -> None:
        if self.shard_mb < 1:
            raise ValueError(f"shard_mb must be >= 1, got {self.shard_mb}")


#: what :func:`copy_tokenizer_files` copies: tokenizer, chat template and generation files
TOKENIZER_GLOBS = ("tokenizer*", "special_tokens_map.json", "generation_config.json", "*.jinja", "vocab.*",
                   "merges.txt", "added_tokens.json", "*.tiktoken", "chat_template.json")


def one_group_plan(source: Any, requested: IntFormat, unfit: Callable[[tuple[int, int]], str | None]
                   ) -> tuple[QuantPlan, IntFormat]:
    """The plan and the one format used: decoder-block linears that the layout can pack
    (``unfit(shape)`` is ``None``) get ``requested`` with the largest group, halving down to
    32, that divides every one of them (else per-channel), with the reason when it changed;
    other linears stay in float with theirs."""
    linears = {n: s for n, s in source.linear_shapes().items() if source.is_block_linear(n)}
    packable = {n: s for n, s in linears.items() if unfit(s) is None}
    g = requested.options.group_size
    while g and any(s[1] % g for s in packable.values()):
        g = g // 2 if g // 2 >= MIN_FALLBACK_GROUP else 0
    fmt = IntFormat(replace(requested.options, group_size=g))
    plan = QuantPlan()
    for name, shape in source.linear_shapes().items():
        if name not in linears:
            plan.add(TensorPlan(name, shape, None, reason=source.float_reason(name)))
        elif name not in packable:
            plan.add(TensorPlan(name, shape, None, reason=f"{unfit(shape)} (kept in float)"))
        elif fmt != requested:
            plan.add(TensorPlan(name, shape, fmt, requested=requested,
                                reason=f"one group size for every linear of the checkpoint: fallback {fmt.spec}"))
        else:
            plan.add(TensorPlan(name, shape, fmt))
    return plan, fmt


def copy_tokenizer_files(source: Path, folder: Path) -> None:
    """Copy the tokenizer, chat template and generation config files of a model folder."""
    for pattern in TOKENIZER_GLOBS:
        for f in source.glob(pattern):
            if f.is_file() and not (folder / f.name).exists():
                shutil.copy2(f, folder / f.name)


def stored_shapes(folder: Path, files: list[str]) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in the written safetensors ``files`` (a file that cannot be read
    back is an :class:`ArtifactError`: the write failed)."""
    from safetensors import safe_open

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


def artifact_skeleton(folder: Path, dtype: torch.dtype) -> tuple[nn.Module, ModelSource]:
    """An empty (meta) model from an artifact folder's ``config.json`` (its
    ``quantization_config`` ignored) and a :class:`ModelSource` over its safetensors files."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    arch = find_architecture(config.architectures[0])
    weight_map, _ = weight_files(folder, allow_pickle=False)
    source = ModelSource(folder, config, arch, weight_map)
    return source.skeleton(dtype), source


def load_float_parameters(model: nn.Module, source: ModelSource, device: torch.device,
                          dtype: torch.dtype) -> nn.Module:
    """Fill every parameter still on the meta device from the artifact (tied names share one),
    and every buffer the artifact stores (DeepSeek-V3's router score-correction bias)."""
    for bname, _b in list(model.named_buffers()):
        if source.has_tensor(bname):
            set_buffer(model, bname, source.read([bname])[bname].to(device))
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


#: the prompt of the commands exporters print (``Exporter.run_command``)
PROMPT = "Once upon a time"


def python_command(code: str) -> str:
    """``python -c '<code>'`` quoted for a POSIX shell (write ``code`` with double-quoted strings)."""
    import shlex

    return f"python -c {shlex.quote(code)}"


def transformers_command(folder: Path) -> str:
    """A shell command that generates from a Hugging Face checkpoint folder with transformers."""
    return python_command(f"from transformers import pipeline; print(pipeline({json.dumps('text-generation')}, "
                          f"{json.dumps(str(folder))})({json.dumps(PROMPT)}, max_new_tokens=32)[0]"
                          f"[{json.dumps('generated_text')}])")


def gptqmodel_command(folder: Path) -> str:
    """A shell command that generates from a GPTQ/AWQ checkpoint folder with GPTQModel."""
    return python_command(f"from gptqmodel import GPTQModel; m = GPTQModel.load({json.dumps(str(folder))}); "
                          f"print(m.tokenizer.decode(m.generate({json.dumps(PROMPT)}, max_new_tokens=32)[0]))")


def is_moe_checkpoint(folder: Path) -> bool:
    """True when the checkpoint's ``config.json`` describes a mixture of experts."""
    try:
        cfg = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    cfg = cfg.get("text_config", cfg)
    return any(int(cfg.get(k) or 0) > 0 for k in ("num_local_experts", "num_experts", "n_routed_experts"))


def attach_kv_scales(model: nn.Module, source: ModelSource, act: Any, device: torch.device) -> None:
    """Simulate the KV cache of a reloaded artifact: every block's ``k_scale``/``v_scale`` read
    from the checkpoint onto its attention module (``quantfoundry.model.kv_cache``)."""
    from ..model.kv_cache import KVState, attach, enable

    arch = source.architecture
    enable(model)
    for i in range(source.num_layers):
        name = f"{source.layer_prefix(i)}.{arch.attention}"
        if not source.has_tensor(f"{name}.k_scale"):
            raise ArtifactError(f"{name}.k_scale is missing: the artifact declares a KV-cache scheme")
        t = source.read([f"{name}.k_scale", f"{name}.v_scale"])
        attach(model.get_submodule(name), KVState(act, k_scale=t[f"{name}.k_scale"].float().to(device),
                                                  v_scale=t[f"{name}.v_scale"].float().to(device)))

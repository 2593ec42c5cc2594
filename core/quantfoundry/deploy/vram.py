"""How much GPU memory a model needs to serve: weights per format, KV cache, activations,
runtime — from its ``config.json`` alone (no weight is read or downloaded).

The tensor shapes are those of the model transformers builds from the config on the ``meta``
device, so every tensor is counted as the checkpoint holds it: every expert of a mixture of
experts (whatever the number active per token), shared experts, routers, tied embeddings once.
Each candidate format gives every tensor its exact bytes (:meth:`Format.nbytes`), through the
exporter that stores it (:meth:`Exporter.preset_formats`: llama.cpp's mixes give ``output`` Q6_K
and bump ``attn_v``/``ffn_down``), or by the common rule (decoder-block linears and experts in the
format, everything else in 16 bits).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelLoadError, UsageError

GiB = 2**30

#: what the engine reserves beside weights, KV cache and activations (CUDA context, cuBLAS
#: workspaces, the allocator's fragmentation): an assumption, stated in every report
RUNTIME_OVERHEAD = int(1.0 * GiB)
#: the fraction of a GPU's memory a plan may fill (vLLM's default gpu_memory_utilization)
UTILIZATION = 0.90
#: tokens one forward pass prefills at most (vLLM's chunked-prefill budget); activations scale with it
PREFILL_CHUNK = 8192

#: KV-cache element sizes in bytes: 16-bit, fp8 (vLLM), int8, and llama.cpp's q8_0 / q4_0 cache
#: types (a 2-byte scale per 32 elements)
KV_BYTES: dict[str, float] = {"fp16": 2.0, "bf16": 2.0, "fp8": 1.0, "int8": 1.0, "q8_0": 34 / 32, "q4_0": 18 / 32}

#: memory of common GPUs in MiB, as ``nvidia-smi`` reports it (the marketing "GB" are GiB here)
GPUS: dict[str, int] = {
    "T4": 15360, "RTX3060": 12288, "RTX4070": 12282, "RTX4080": 16376, "RTX3090": 24576, "RTX4090": 24564,
    "RTX5090": 32607, "A10": 23028, "L4": 23034, "A6000": 49140, "L40S": 46068, "A100-40GB": 40960,
    "A100": 81920, "H100": 81559, "H200": 143771, "B200": 183359, "MI300X": 196592,
}


@dataclass(frozen=True)
class Tensor:
    """One stored tensor: name, shape, and its kind — ``linear`` (a decoder-block linear),
    ``experts`` (stacked expert weights ``[E, out, in]``), ``embedding``, ``head``, ``router``
    or ``other`` (norms, biases, anything 1-D)."""

    name: str
    shape: tuple[int, ...]
    kind: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class ModelShape:
    """A model's tensors and the facts the KV cache and the advice need, from its config."""

    name: str
    tensors: list[Tensor]
    config: Any
    layers: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int
    experts: int = 0
    experts_per_token: int = 0
    sliding_window: int | None = None
    layer_types: list[str] = field(default_factory=list)
    kv_lora_rank: int = 0
    rope_head_dim: int = 0

    @property
    def parameters(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def active_parameters(self) -> int:
        """Parameters one token's forward pass reads: every expert tensor scaled to the experts
        a token is routed to (compute, not memory: every expert stays resident)."""
        if not self.experts:
            return self.parameters
        k = self.experts_per_token / self.experts
        return sum(int(t.numel * k) if t.kind == "experts" else t.numel for t in self.tensors)

    def kv_bytes_per_token(self, kv: str = "fp16", context: int | None = None) -> float:
        """KV-cache bytes for one token of one sequence, averaged over a sequence of ``context``
        tokens (sliding-window layers keep only their window)."""
        elt = KV_BYTES[kv]
        per_layer = (self.kv_lora_rank + self.rope_head_dim) if self.kv_lora_rank else 2 * self.kv_heads * self.head_dim
        total = 0.0
        for i in range(self.layers):
            kept = 1.0
            if context and self.sliding_window and self._sliding(i):
                kept = min(context, self.sliding_window) / context
            total += per_layer * elt * kept
        return total

    def _sliding(self, i: int) -> bool:
        if self.layer_types:
            return self.layer_types[i] == "sliding_attention"
        return True  # one window for every layer (Mistral-7B-v0.1's sliding_window)


def _config(model: str | Path, *, trust_remote_code: bool = False, revision: str | None = None) -> tuple[Any, str]:
    """The config of a folder, a bare ``config.json`` or a hub id (only config.json is fetched)."""
    from transformers import AutoConfig

    path = Path(model).expanduser()
    try:
        if path.is_file():
            raw = json.loads(path.read_text())
            if "model_type" not in raw:
                raise UsageError(f"{path} has no model_type; pass a transformers config.json")
            mt = raw.pop("model_type")
            return AutoConfig.for_model(mt, **raw), path.parent.name or path.stem
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise UsageError(f"{path} has no config.json; pass a model folder, a config.json or a hub id")
            return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code), path.resolve().name
        text = str(model)
        if text.startswith((".", "/", "~")) or text.count("/") != 1:
            raise UsageError(f"{model} does not exist; pass a model folder, a config.json or a hub id (org/name)")
        return AutoConfig.from_pretrained(text, revision=revision, trust_remote_code=trust_remote_code), \
            text.split("/")[1]
    except (UsageError, ModelLoadError):
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot read the config of {model}: {first}") from None


def model_shape(model: str | Path, *, trust_remote_code: bool = False, revision: str | None = None) -> ModelShape:
    """Every tensor of the model transformers builds from the config, on ``meta`` (no memory)."""
    from torch import nn
    from transformers import AutoModelForCausalLM

    config, name = _config(model, trust_remote_code=trust_remote_code, revision=revision)
    try:
        with torch.device("meta"):
            net = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"transformers cannot build {name} from its config: {first}") from None
    text = config.get_text_config()
    experts = int(getattr(text, "num_local_experts", None) or getattr(text, "num_experts", None)
                  or getattr(text, "n_routed_experts", None) or 0)
    head = net.get_output_embeddings()
    tensors = []
    for pname, p in net.named_parameters():
        owner = net.get_submodule(pname.rsplit(".", 1)[0]) if "." in pname else net
        in_block = ".layers." in f".{pname}"
        if isinstance(owner, nn.Embedding):
            kind = "embedding"
        elif owner is head:
            kind = "head"
        elif in_block and p.dim() == 3 and "expert" in pname:
            kind = "experts"
        elif in_block and isinstance(owner, nn.Linear) and p.dim() == 2 and pname.endswith("weight"):
            kind = "router" if experts and owner.out_features == experts else "linear"
        elif in_block and p.dim() == 2 and experts and p.shape[0] == experts:
            kind = "router"
        else:
            kind = "other"
        tensors.append(Tensor(pname, tuple(p.shape), kind))
    heads = int(text.num_attention_heads)
    layer_types = list(getattr(text, "layer_types", None) or [])
    window = getattr(text, "sliding_window", None)
    if getattr(text, "use_sliding_window", True) is False:
        window = None
    if layer_types and "sliding_attention" not in layer_types:
        window = None
    return ModelShape(
        name=name, tensors=tensors, config=config, layers=int(text.num_hidden_layers),
        kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(text, "head_dim", None) or text.hidden_size // heads), hidden=int(text.hidden_size),
        intermediate=int((getattr(text, "moe_intermediate_size", None) if experts else None)
                         or getattr(text, "intermediate_size", 0) or 0),
        vocab=int(text.vocab_size), experts=experts,
        experts_per_token=int(getattr(text, "num_experts_per_tok", 0) or 0) if experts else 0,
        sliding_window=int(window) if window else None, layer_types=layer_types,
        kv_lora_rank=int(getattr(text, "kv_lora_rank", 0) or 0),
        rope_head_dim=int(getattr(text, "qk_rope_head_dim", 0) or 0))


def uniform_formats(shape: ModelShape, fmt: Any) -> dict[str, Any]:
    """The common rule: decoder-block linears and experts in ``fmt`` (its documented fallback
    where a shape does not fit), everything else in 16 bits (``None``)."""
    out: dict[str, Any] = {}
    for t in shape.tensors:
        if t.kind not in ("linear", "experts"):
            out[t.name] = None
            continue
        matrix = t.shape[-2:]
        chosen = fmt if fmt.check_shape(matrix) is None else fmt.fallback(matrix)
        out[t.name] = chosen if chosen is not None and chosen.check_shape(matrix) is None else None
    return out


def weight_bytes(shape: ModelShape, formats: Mapping[str, Any], float_bytes: Callable[[Tensor], int] | None = None) -> int:
    """Exact bytes of every tensor: ``formats[name]`` (a Format, or ``None``: float — 16 bits, or
    ``float_bytes(tensor)``), stacked experts counted once per expert."""
    total = 0
    for t in shape.tensors:
        fmt = formats.get(t.name)
        if fmt is None:
            total += float_bytes(t) if float_bytes is not None else 2 * t.numel
        else:
            stack = math.prod(t.shape[:-2]) if len(t.shape) > 2 else 1
            total += stack * fmt.nbytes((int(t.shape[-2]), int(t.shape[-1])))
    return total


@dataclass(frozen=True)
class Budget:
    """One format's memory at a context and batch: every term in bytes."""

    label: str
    weights: int
    kv_cache: int
    activations: int
    runtime: int = RUNTIME_OVERHEAD

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.runtime

    def fits(self, gpu_bytes: int, gpus: int = 1) -> bool:
        return self.total <= UTILIZATION * gpu_bytes * gpus


def activation_bytes(shape: ModelShape, context: int, batch: int, dtype_bytes: int = 2) -> int:
    """Peak activations of one forward pass (an assumption, stated with the report): a prefill
    chunk of ``min(context × batch, PREFILL_CHUNK)`` tokens holding the residual stream, the
    attention's q/k/v and output and the MLP's widest intermediate (gate and up together) of
    one block at a time, plus float32 logits for one token per sequence."""
    chunk = min(context * batch, PREFILL_CHUNK)
    width = shape.intermediate * (max(shape.experts_per_token, 1) if shape.experts else 1)
    per_token = 4 * shape.hidden + 2 * width
    return chunk * per_token * dtype_bytes + batch * shape.vocab * 4


def gpu_bytes(spec: str) -> tuple[str, int]:
    """``H100`` / ``RTX4090`` / ``24GB`` / ``24GiB`` → (label, bytes); sizes in GB are GiB (as GPU
    memory is sold)."""
    key = spec.strip().upper().replace(" ", "").replace("NVIDIA", "")
    for name, mib in GPUS.items():
        if key == name.upper():
            return name, mib * 2**20
    import re

    m = re.fullmatch(r"([0-9]*\.?[0-9]+)(GB|GIB|G)", key)
    if m is None:
        raise UsageError(f"--gpu {spec!r}: name a GPU ({', '.join(GPUS)}) or a size such as 24GB")
    return f"{m.group(1)} GiB", int(float(m.group(1)) * GiB)


def advice(shape: ModelShape) -> str:
    """The seeds' size-based advice (active parameters for a MoE's quality, all of them for memory)."""
    n = shape.parameters / 1e9
    if n < 3:
        return ("under 3B parameters: keep 8-bit (Q8_0, int8 / fp8): small models lose the most to 4-bit "
                "rounding, and 8-bit weights are small anyway")
    if n < 14:
        return ("7-13B class: Q5_K_M or Q6_K by default for quality, Q4_K_M when memory is tight; for vLLM, "
                "AWQ/GPTQ int4-g128 (or FP8 on Hopper)")
    if n < 40:
        return "14-40B class: Q4_K_M / int4-g128 fits one 24-48 GB GPU; Q5_K_M when memory allows"
    return ("70B class and larger: Q4_K_M or int4-g128 (AWQ/GPTQ); below 4 bits the loss grows fast — plan for "
            "more GPUs before going to Q3/Q2")


#: formats ``qf plan`` compares when none are named: 16-bit, vLLM's fp8/int8/int4, bitsandbytes'
#: NF4, and llama.cpp's file types (each through the exporter that offers it, when installed)
DEFAULT_FORMATS = ("bf16", "fp8-e4m3", "int8-sym", "int4-g128", "nf4", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M",
                   "Q2_K")
DEFAULT_GPUS = ("RTX4090", "L40S", "H100")


@dataclass
class MemoryPlan:
    """``qf plan``'s answer: the model, the run's shape, one :class:`Budget` per format, the GPUs."""

    shape: ModelShape
    context: int
    batch: int
    kv: str
    rows: list[Budget]
    gpus: list[tuple[str, int]]
    skipped: list[str] = field(default_factory=list)

    def gpus_needed(self, row: Budget, gpu: int) -> int:
        """GPUs of ``gpu`` bytes the row needs (tensor parallel: weights and KV split, runtime per GPU)."""
        usable = UTILIZATION * gpu - row.runtime
        return max(1, math.ceil((row.total - row.runtime) / usable)) if usable > 0 else 0

    def assumptions(self) -> list[str]:
        return [f"KV cache: {self.kv}, {self.context:,} tokens x {self.batch} sequence(s)"
                + (f"; sliding-window layers keep {self.shape.sliding_window:,} tokens" if self.shape.sliding_window
                   else ""),
                f"activations: one prefill chunk of min(context x batch, {PREFILL_CHUNK:,}) tokens through one "
                "block at a time (residual, q/k/v/output, the MLP's gate and up) in 16 bits, float32 logits of "
                "one token per sequence",
                f"runtime: {RUNTIME_OVERHEAD / GiB:.1f} GiB per GPU (CUDA context, workspaces, fragmentation)",
                f"a GPU is filled to {UTILIZATION:.0%} at most (vLLM's gpu_memory_utilization)"]

    def to_json(self) -> dict[str, Any]:
        s = self.shape
        return {"model": s.name, "parameters": s.parameters, "active_parameters": s.active_parameters,
                "experts": s.experts, "experts_per_token": s.experts_per_token,
                "kv_bytes_per_token": s.kv_bytes_per_token(self.kv, self.context), "context": self.context,
                "batch": self.batch, "kv_cache": self.kv, "assumptions": self.assumptions(), "advice": advice(s),
                "gpus": {name: b for name, b in self.gpus}, "skipped": self.skipped,
                "formats": [{"format": r.label, "weights": r.weights, "bpw": 8 * r.weights / s.parameters,
                             "kv_cache": r.kv_cache, "activations": r.activations, "runtime": r.runtime,
                             "total": r.total, "gpus_needed": {n: self.gpus_needed(r, b) for n, b in self.gpus}}
                            for r in self.rows]}


def _formats_for(shape: ModelShape, label: str) -> dict[str, Any] | None:
    """Each tensor's format under ``label``: a preset an exporter offers (llama.cpp's Q4_K_M), a
    registered format spec by the common rule, or ``bf16``/``fp16``; None if nothing knows it."""
    from ..formats import resolve_format
    from ..plugins import get_plugin_manager

    if label.lower() in ("bf16", "fp16", "float16", "bfloat16"):
        return {t.name: None for t in shape.tensors}
    for entry in get_plugin_manager().registry("exporter").entries.values():
        formats = entry.component.preset_formats(shape, label)
        if formats is not None:
            return formats
    try:
        fmt = resolve_format(label)
    except Exception:
        return None
    return uniform_formats(shape, fmt)


def plan_memory(model: str | Path, *, context: int = 4096, batch: int = 1, kv: str = "fp16",
                formats: tuple[str, ...] | list[str] | None = None, gpus: tuple[str, ...] | list[str] | None = None,
                trust_remote_code: bool = False, revision: str | None = None) -> MemoryPlan:
    """The memory each format needs to serve ``model`` at ``context`` tokens × ``batch`` sequences."""
    if context < 1 or batch < 1:
        raise UsageError("--context and --batch must be positive")
    if kv not in KV_BYTES:
        raise UsageError(f"--kv-cache {kv!r}: choose one of {', '.join(KV_BYTES)}")
    gpu_list = [gpu_bytes(g) for g in (gpus or DEFAULT_GPUS)]
    shape = model_shape(model, trust_remote_code=trust_remote_code, revision=revision)
    kv_total = int(shape.kv_bytes_per_token(kv, context) * context * batch)
    act = activation_bytes(shape, context, batch)
    rows, skipped = [], []
    for label in formats or DEFAULT_FORMATS:
        chosen = _formats_for(shape, label)
        if chosen is None:
            if formats:
                raise UsageError(f"--format {label!r}: no registered format or exporter preset has that name "
                                 "(`qf formats` lists them)")
            skipped.append(label)
            continue
        rows.append(Budget(label, weight_bytes(shape, chosen), kv_total, act))
    return MemoryPlan(shape, context, batch, kv, rows, gpu_list, skipped)

"""Move parts of a meta-device skeleton onto a real device, reading only their weights."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ModelLoadError
from ..memory import trim_memory
from .source import ModelSource


def tied_source(model: nn.Module, source: ModelSource, name: str) -> str | None:
    """The stored tensor a missing ``name`` is tied to (``lm_head.weight`` → embeddings)."""
    tied = getattr(model, "_tied_weights_keys", None)
    if isinstance(tied, dict) and name in tied and source.has_tensor(tied[name]):
        return str(tied[name])
    arch = source.architecture
    if name == f"{arch.lm_head}.weight":
        for emb in arch.embeddings:
            if source.has_tensor(f"{emb}.weight"):
                return f"{emb}.weight"
    return None


def set_parameter(module: nn.Module, name: str, value: torch.Tensor | nn.Parameter) -> None:
    """Replace the parameter ``name``; pass one ``nn.Parameter`` to several names to tie them."""
    parent_name, _, attr = name.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    parent._parameters[attr] = value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)


def set_buffer(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace the buffer ``name`` by ``value`` in the buffer's own dtype (a checkpoint-stored
    buffer, such as DeepSeek-V3's router score-correction bias)."""
    parent_name, _, attr = name.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    parent._buffers[attr] = value.to(parent._buffers[attr].dtype)


def is_buffer(module: nn.Module, name: str) -> bool:
    parent_name, _, attr = name.rpartition(".")
    return attr in (module.get_submodule(parent_name) if parent_name else module)._buffers


def stored_names(model: nn.Module, module: nn.Module, prefix: str, source: ModelSource,
                 skip_prefix: str | None = None) -> dict[str, list[str]]:
    """Checkpoint tensor name → the relative parameter names of ``module`` it fills (and of the
    buffers the checkpoint stores, such as DeepSeek-V3's router score-correction bias)."""
    rel_names = [n for n, _ in module.named_parameters(remove_duplicate=False)
                 if not (skip_prefix and n.startswith(skip_prefix))]
    full = {rel: f"{prefix}.{rel}" if prefix else rel for rel in rel_names}
    wanted: dict[str, str] = {rel: f"{prefix}.{rel}" if prefix else rel for rel in _stored_buffers(module, prefix, source)
                              if not (skip_prefix and rel.startswith(skip_prefix))}
    for rel, name in full.items():
        if source.has_tensor(name):
            wanted[rel] = name
        else:
            alias = tied_source(model, source, name)
            if alias is None:
                raise ModelLoadError(f"tensor {name} is missing from the checkpoint in {source.path}")
            wanted[rel] = alias
    users: dict[str, list[str]] = {}
    for rel, name in wanted.items():
        users.setdefault(name, []).append(rel)
    return users


def _stored_buffers(module: nn.Module, prefix: str, source: ModelSource) -> list[str]:
    return [n for n, _ in module.named_buffers() if source.has_tensor(f"{prefix}.{n}" if prefix else n)]


def materialize(
    model: nn.Module, module: nn.Module, prefix: str, source: ModelSource, *,
    dtype: torch.dtype, device: torch.device, skip_prefix: str | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> None:
    """Load every parameter of ``module`` (named ``prefix.*`` in the checkpoint) onto ``device``.

    :param skip_prefix: leave parameters whose relative name starts with it on ``meta``.
    :param tensors: the stored tensors, already read (a prefetch, whose reader checks them for
        NaN/Inf), taken out of the dict as they are converted; else read one at a time, and any
        NaN/Inf raises ``NonFiniteWeightsError``.
    """
    users = stored_names(model, module, prefix, source, skip_prefix)
    # the read tensors are consumed: each leaves the dict once converted, so its memory goes then
    stream = ((n, tensors.pop(n)) for n in sorted(users)) if tensors is not None else \
        source.iter_read(sorted(users), check_finite=True)
    for name, tensor in stream:  # one stored tensor at a time
        param = nn.Parameter(tensor.to(device=device, dtype=dtype, non_blocking=tensor.is_pinned()),
                             requires_grad=False)
        del tensor
        for rel in users[name]:  # tied names (lm_head of tied embeddings) share one Parameter
            if is_buffer(module, rel):  # a buffer the checkpoint stores: its values, as a buffer
                set_buffer(module, rel, param.data)
            else:
                set_parameter(module, rel, param)


def release(module: nn.Module) -> None:
    """Send a module's parameters and buffers (QuantLinear codes too) to ``meta`` and give
    the freed memory back to the operating system."""
    module.to("meta")
    trim_memory()


def materialize_outside_blocks(model: nn.Module, source: ModelSource, *, dtype: torch.dtype,
                               device: torch.device) -> None:
    """Load everything but the decoder blocks (embeddings, final norm, output head)."""
    materialize(model, model, "", source, dtype=dtype, device=device,
                skip_prefix=source.architecture.layers + ".")


def load_full_model(source: ModelSource, *, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The whole float model on ``device`` (for evaluating the original)."""
    model = source.skeleton(dtype)
    materialize(model, model, "", source, dtype=dtype, device=device)
    return model.to(device)

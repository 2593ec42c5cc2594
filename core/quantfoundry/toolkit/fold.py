"""Folding per-input-channel scales into a model so the full-precision model is unchanged
(AWQ's and SmoothQuant's equivalent transformation).

A group of linears reading ``X`` (an :class:`~quantfoundry.InputGroup` of the architecture map)
gets its weight columns multiplied by ``s`` and ``X`` divided by ``s`` at its source: the norm before it (``weight' = (offset + weight)/s − offset``; the bias
``/ s``) or the linear before it (output rows and bias ``/ s``: ``v_proj`` → ``o_proj`` under
GQA divides each KV channel by the scale its query heads share; ``up_proj`` → ``down_proj``,
since ``down``'s input is ``act(gate) · up``, linear in ``up``'s output).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import QFError
from ..roles.architecture import InputGroup, concrete_groups
from ..roles.block import Block


@dataclass(frozen=True)
class Tie:
    """Input channels ``c`` of a linear that must share a scale: those with the same
    ``c // (heads_per_kv · head_dim) · head_dim + c % head_dim`` (the KV channel they read
    under grouped-query attention)."""

    head_dim: int
    heads_per_kv: int

    def index(self, n_in: int, device: torch.device) -> torch.Tensor:
        """For each input channel, the tied channel (KV channel) it reads."""
        c = torch.arange(n_in, device=device)
        return c // (self.heads_per_kv * self.head_dim) * self.head_dim + c % self.head_dim

    def reduce(self, v: torch.Tensor) -> torch.Tensor:
        """Per input channel → per tied channel: the mean over each tied set."""
        idx = self.index(v.numel(), v.device)
        out = torch.zeros(v.numel() // self.heads_per_kv, dtype=v.dtype, device=v.device)
        return out.index_add_(0, idx, v) / self.heads_per_kv

    def expand(self, v: torch.Tensor) -> torch.Tensor:
        """Per tied channel → per input channel, along the last dim."""
        return v[..., self.index(v.shape[-1] * self.heads_per_kv, v.device)]


@dataclass
class BlockGroup:
    """One input group of the architecture map as it is in a real block: its ``group``, the
    block-relative names of all its linears (``members``, patterns expanded) and of those the
    plan quantizes (``planned``)."""

    group: InputGroup
    members: list[str]
    planned: list[str]


def block_groups(block: Block, who: str) -> list[BlockGroup]:
    """The architecture's input groups present in ``block`` that hold a planned linear, in
    execution order (a group whose ``prev`` has a ``*`` becomes one group per match: each
    expert's own); a planned linear in no group is an error naming ``who`` (a method that
    scales input channels per group cannot treat it)."""
    arch = block.architecture
    linears = [n for n, m in block.module.named_modules() if isinstance(m, nn.Linear)]
    groups = []
    modules = [n for n, _ in block.module.named_modules()]
    for pattern in arch.groups:
        for group in concrete_groups(pattern, modules):
            members = [n for pat in group.linears for n in arch.match(pat, linears)]
            planned = [n for n in members if n in block.formats]
            if planned:
                groups.append(BlockGroup(group, members, planned))
    missing = sorted(set(block.formats) - {n for g in groups for n in g.planned})
    if missing:
        raise QFError(f"{who}: {block.full_name(missing[0])} is in no input group of the "
                      f"{arch.name!r} architecture map, so {who} cannot scale it")
    return groups


@dataclass
class FoldPoint:
    """Where a group's scale goes: the module before it, and the tie its channels need."""

    prev: nn.Module
    kind: str  # "norm" | "linear"
    tie: Tie | None = None
    #: float modules reading the same input (a router): their columns take the scale too
    readers: list[nn.Module] = field(default_factory=list)


def fold_point(block: Block, group: InputGroup, n_in: int, config: Any, allow_gqa: bool) -> FoldPoint | str:
    """The group's fold point, or the reason it has none (the group is then left unscaled).

    :param n_in: the group's input width.
    :param config: the model's config (head counts, to tie ``v_proj`` → ``o_proj`` under GQA).
    :param allow_gqa: fold into a ``v_proj`` that feeds more query heads than it has KV heads
        (one scale per KV channel, :class:`Tie`); else that group has no fold point.
    """
    if group.prev is None or group.prev_kind == "none":
        return "nothing before it can absorb a per-channel scale (no fold point in the architecture map)"
    try:
        prev = block.module.get_submodule(group.prev)
    except AttributeError:
        return f"its fold point {group.prev} is not in this block"
    readers = []
    for name in group.readers:
        try:
            reader = block.module.get_submodule(name)
        except AttributeError:
            continue  # a layer without it (a dense layer of a MoE model)
        w = getattr(reader, "weight", None)
        if not isinstance(w, torch.Tensor) or w.ndim != 2 or w.shape[1] != n_in:
            return f"{name} reads the group's input but has no [out, {n_in}] weight to take the scale"
        readers.append(reader)
    if group.prev_kind == "norm":
        w = getattr(prev, "weight", None)
        if not isinstance(w, torch.Tensor) or w.shape != (n_in,):
            return f"{group.prev} has no per-channel weight of {n_in} to absorb a scale"
        return FoldPoint(prev, "norm", readers=readers)
    if not isinstance(prev, nn.Linear):
        return f"{group.prev} is a {type(prev).__name__}, not a linear"
    if readers:
        return f"{group.prev} is a linear and {group.readers[0]} reads its output too: not supported"
    if prev.out_features == n_in:
        return FoldPoint(prev, "linear")
    heads, kv = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)
    if heads and kv and head_dim and n_in == heads * head_dim and prev.out_features == kv * head_dim:
        if not allow_gqa:
            return f"{group.prev} → GQA ({heads} query heads over {kv} KV heads) and fold_gqa=false"
        return FoldPoint(prev, "linear", Tie(head_dim, heads // kv))
    return (f"{group.prev} has {prev.out_features} outputs for {n_in} inputs and no known head layout "
            "to tie them")


def _as_stored(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` rounded to the checkpoint's dtype (what the artifact will hold), kept in its own."""
    return t.to(dtype).to(t.dtype)


@torch.no_grad()
def apply_fold(point: FoldPoint, linears: list[nn.Linear], scale: torch.Tensor, searched: torch.Tensor,
               norm_offset: float, stored: torch.dtype, quantized_prev: bool) -> None:
    """Scale the group's columns by ``scale`` and divide the fold point by ``searched`` (the
    scale per tied channel; ``scale`` itself without a tie).

    :param norm_offset: the architecture's ``norm_weight_offset`` (Gemma: the norm is ``1 + w``).
    :param stored: the checkpoint's float dtype.
    :param quantized_prev: the fold point is a linear that will be quantized (kept exact).

    The norm (and a float-kept previous linear) is rounded to the checkpoint's dtype, so the
    in-memory model is the one the artifact holds; weights that will be quantized stay exact.
    """
    for lin in linears:
        lin.weight.mul_(scale.to(lin.weight.dtype).unsqueeze(0))
    for reader in point.readers:  # kept in float: what the artifact holds
        reader.weight.copy_(_as_stored(reader.weight * scale.to(reader.weight.dtype).unsqueeze(0), stored))
    prev = point.prev
    s = searched.to(prev.weight.dtype)
    if point.kind == "norm":
        new = (norm_offset + prev.weight.float()) / searched.float() - norm_offset
        prev.weight.copy_(_as_stored(new.to(prev.weight.dtype), stored))
    else:
        new_w = prev.weight / s.unsqueeze(1)
        prev.weight.copy_(new_w if quantized_prev else _as_stored(new_w, stored))
    bias = getattr(prev, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.copy_(_as_stored(bias / s, stored))

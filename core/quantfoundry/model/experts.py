"""Mixture-of-experts layers as separate linears, and the routing of calibration tokens.

transformers ≥ 5 holds a MoE layer's experts fused: ``experts.gate_up_proj`` ``[E, 2I, H]`` and
``experts.down_proj`` ``[E, H, I]``, loaded from checkpoints that store one tensor per expert
(``experts.3.gate_proj.weight``, Mixtral's ``block_sparse_moe.experts.3.w1.weight``). A
quantizer rounds one linear at a time, and every engine reads the per-expert names, so the
skeleton (:func:`unfuse_experts`) holds each expert as its own ``gate``/``up``/``down``
``nn.Linear`` under the checkpoint's names: :class:`ExpertList`, called exactly as the fused
module is (``experts(hidden, top_k_index, top_k_weights)``) and computing the same sums. The
router stays what it is (a float module, never a planned linear).

While a block is calibrated, :func:`expert_calibration` makes every expert see enough tokens:
``all`` runs every token through every expert (statistics only: the block's output still sums
the routed experts alone), ``fill`` gives an expert the router sent fewer than ``min_tokens``
tokens its ``min_tokens`` most probable ones, ``topk`` keeps the model's routing. It counts the
tokens each expert's linears saw, so an expert that still saw too few can be rounded to nearest.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ..distributed import all_reduce_, all_reduce_count
from ..errors import UnsupportedArchitectureError

Routing = Literal["topk", "fill", "all"]
ROUTINGS: tuple[str, ...] = ("topk", "fill", "all")


class Expert(nn.Module):
    """One expert's gated MLP: ``down(act(gate(x)) * up(x))``; the linears' attribute names are
    the checkpoint's (``gate_proj``/``up_proj``/``down_proj``, Mixtral's ``w1``/``w3``/``w2``)."""

    def __init__(self, hidden: int, intermediate: int, act: nn.Module, names: tuple[str, str, str],
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        self.names = names
        gate, up, down = names
        setattr(self, gate, nn.Linear(hidden, intermediate, bias=False, dtype=dtype, device=device))
        setattr(self, up, nn.Linear(hidden, intermediate, bias=False, dtype=dtype, device=device))
        setattr(self, down, nn.Linear(intermediate, hidden, bias=False, dtype=dtype, device=device))
        self.act_fn = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act_fn(gate(x)) * up(x))


@dataclass
class _Calibration:
    routing: str
    min_tokens: int
    total: int  # calibration tokens in all (fill: each call tops up to its share of min_tokens)
    counts: torch.Tensor  # tokens each expert's linears saw, over the calibration
    probs: torch.Tensor | None = None  # fill: the routing probabilities of the current call [tokens, E]
    stop_after_routing: bool = False
    hooks: list[Any] = field(default_factory=list)


class _RoutingCounted(Exception):
    pass


class ExpertList(nn.ModuleList):
    """The experts of one MoE layer as separate modules (``experts.0``, ``experts.1``, …)."""

    def __init__(self, experts: list[Expert]):
        super().__init__(experts)
        self._calib: _Calibration | None = None

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        calib = self._calib
        if calib is not None and calib.stop_after_routing:
            calib.counts += torch.bincount(top_k_index.reshape(-1), minlength=len(self))[:len(self)].cpu()
            raise _RoutingCounted
        for e, expert in enumerate(self):
            # the fused module's order (slot-major), so the sums are the same to the last bit
            slot, token = torch.where((top_k_index == e).T)
            extra = None if calib is None else self._extra_tokens(e, token, hidden_states.shape[0], calib)
            if extra is None:
                if token.numel() == 0:
                    continue
                if calib is not None:
                    calib.counts[e] += token.numel()
                h = expert(hidden_states[token])
            else:
                rows = torch.cat([token, extra])
                calib.counts[e] += rows.numel()
                h = expert(hidden_states[rows])[:token.numel()]
                if token.numel() == 0:
                    continue
            h = h * top_k_weights[token, slot, None]
            out.index_add_(0, token, h.to(out.dtype))
        return out

    def _extra_tokens(self, e: int, token: torch.Tensor, n: int, calib: _Calibration) -> torch.Tensor | None:
        """The tokens ``e`` runs on for statistics only, beyond those routed to it."""
        if calib.routing == "all":
            routed = torch.zeros(n, dtype=torch.bool, device=token.device)
            routed[token] = True
            return torch.nonzero(~routed).flatten()
        quota = min(n, -(-calib.min_tokens * n // max(calib.total, 1)))  # this batch's share, rounded up
        if calib.routing != "fill" or token.numel() >= quota or calib.probs is None:
            return None
        prob = calib.probs[:, e].clone()
        prob[token] = -1.0  # already routed
        want = quota - token.numel()
        return torch.topk(prob, want).indices if want > 0 else None


def expert_lists(module: nn.Module) -> dict[str, ExpertList]:
    """Module name → :class:`ExpertList` of every MoE layer inside ``module``."""
    return {name: m for name, m in module.named_modules() if isinstance(m, ExpertList)}


@contextmanager
def expert_calibration(module: nn.Module, routing: str, min_tokens: int,
                       total: int) -> Iterator[dict[str, torch.Tensor]]:
    """Route calibration tokens to the experts of ``module`` (a block) as ``routing`` says while
    the context is open; yields, per :class:`ExpertList` name, the tokens each expert's linears
    saw (a tensor of E counts, growing as the block runs). ``fill`` works batch by batch: an
    expert routed fewer than ``ceil(min_tokens · n / total)`` of a batch's ``n`` tokens (of
    ``total`` calibration tokens in all) gets that many, its most probable ones first."""
    if routing not in ROUTINGS:
        raise ValueError(f"expert routing must be one of {', '.join(ROUTINGS)}, got {routing!r}")
    lists = expert_lists(module)
    counts: dict[str, torch.Tensor] = {}
    for name, experts in lists.items():
        calib = _Calibration(routing, int(min_tokens), int(total), torch.zeros(len(experts), dtype=torch.long))
        router = _router_of(module, name) if routing == "fill" else None
        if router is not None:
            def keep(_m: nn.Module, _args: Any, output: Any, calib: _Calibration = calib,
                     experts: int = len(experts)) -> None:
                logits = (output[0] if isinstance(output, tuple) else output).detach()
                calib.probs = torch.softmax(logits.reshape(-1, experts).float(), dim=-1)  # once per call
            calib.hooks.append(router.register_forward_hook(keep))
        experts._calib = calib
        counts[name] = calib.counts
    try:
        yield counts
    finally:
        for experts in lists.values():
            if experts._calib is not None:
                for h in experts._calib.hooks:
                    h.remove()
            experts._calib = None


def calibration_tokens(block: Any) -> int:
    """Tokens of a block's calibration inputs, all batches together (of every rank)."""
    n = sum(int(h.numel() // h.shape[-1]) for h in block.inputs.hidden) if block.inputs is not None else 0
    return all_reduce_count(n)


@torch.no_grad()
def routed_token_counts(block: Any) -> dict[str, torch.Tensor]:
    """Per :class:`ExpertList` of ``block`` (a :class:`~quantfoundry.Block` with calibration
    inputs), the calibration tokens its router sends each expert (the block runs only up to
    each MoE layer's routing)."""
    lists = expert_lists(block.module)
    if not lists or block.inputs is None:
        return {}
    with expert_calibration(block.module, "topk", 0, 1) as counts:
        for experts in lists.values():
            if experts._calib is not None:
                experts._calib.stop_after_routing = True
        for hidden, kwargs in zip(block.inputs.hidden, block.inputs.kwargs, strict=True):
            try:
                block.module(hidden, **kwargs)
            except _RoutingCounted:
                pass
        return {k: all_reduce_(v.clone(), "sum") for k, v in sorted(counts.items())}


def _router_of(module: nn.Module, experts_name: str) -> nn.Module | None:
    parent = experts_name.rpartition(".")[0]
    try:
        moe = module.get_submodule(parent) if parent else module
    except AttributeError:
        return None
    return getattr(moe, "gate", None) or getattr(moe, "router", None)


# -- building the skeleton ------------------------------------------------------------------

def _is_fused_experts(m: nn.Module) -> bool:
    gu, down = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
    return isinstance(gu, nn.Parameter) and isinstance(down, nn.Parameter) and gu.ndim == 3 and down.ndim == 3


def unfuse_experts(model: nn.Module, names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
                   aliases: tuple[tuple[str, str], ...] = ()) -> int:
    """Replace every fused experts module of ``model`` by an :class:`ExpertList` of
    :class:`Expert` (linears named ``names``, on the fused parameters' device and dtype), and
    register each ``(stored, attribute)`` alias: the module the model calls ``attribute``
    (Mixtral's ``mlp``) is held under the checkpoint's name (``block_sparse_moe``). Returns the
    number of MoE layers."""
    fused = [(n, m) for n, m in model.named_modules() if _is_fused_experts(m)]
    for name, m in fused:
        flags = {k: getattr(m, k, d) for k, d in
                 (("is_transposed", False), ("has_bias", False), ("is_concatenated", True), ("has_gate", True))}
        if flags != {"is_transposed": False, "has_bias": False, "is_concatenated": True, "has_gate": True}:
            raise UnsupportedArchitectureError(
                f"{name} is a fused experts module with {flags}; only concatenated gate/up experts without "
                "biases can be split into linears: register an architecture map for this model")
        e, two_i, hidden = m.gate_up_proj.shape
        act = getattr(m, "act_fn", None)
        if act is None:
            raise UnsupportedArchitectureError(f"{name} has no act_fn; cannot split its experts")
        w = m.gate_up_proj
        experts = ExpertList([Expert(int(hidden), int(two_i) // 2, act, names, dtype=w.dtype, device=w.device)
                              for _ in range(int(e))])
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, experts)
    for stored, attribute in aliases:
        _alias(model, stored, attribute)
    return len(fused)


def _alias(model: nn.Module, stored: str, attribute: str) -> None:
    """Hold each ``attribute`` child of a module under the name ``stored`` instead; the module
    still answers to ``attribute`` (its class gets a read-only property of that name)."""
    for _name, m in list(model.named_modules()):
        if attribute in m._modules and stored not in m._modules:
            child = m._modules.pop(attribute)
            m._modules[stored] = child
            m.__class__ = _aliased_class(type(m), stored, attribute)


_ALIASED: dict[tuple[type, str, str], type] = {}


def _aliased_class(cls: type, stored: str, attribute: str) -> type:
    key = (cls, stored, attribute)
    if key not in _ALIASED:
        _ALIASED[key] = type(cls.__name__, (cls,), {attribute: property(lambda s: s._modules[stored]),
                                                    "__module__": cls.__module__})
    return _ALIASED[key]

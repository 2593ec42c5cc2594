"""Activation quantization in the block loop: each quantized linear gets the input scheme the
plan chose (:class:`~quantfoundry.ActQuant`), static scales are calibrated from the block's
calibration inputs, and the next block's inputs are computed with the inputs quantized as the
engine will quantize them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ..model.kv_cache import KVState, attach, enable, state_of
from ..roles.activation import ActQuant
from ..roles.block import Block
from ..roles.format import QuantizedWeight
from ..roles.plan import QuantPlan
from ..toolkit.observers import make_observer


def attach_input_quant(block: Block, out: dict[str, QuantizedWeight], plan: QuantPlan
                       ) -> dict[str, QuantizedWeight]:
    """``out`` with each weight's planned input scheme, static ones with their calibrated scale
    (the block's linears must hold their dequantized weights: the scales are observed on the
    inputs the quantized block produces)."""
    acts: dict[str, ActQuant] = {}
    for rel in out:
        entry = plan.entries.get(block.full_name(rel))
        if entry is not None and entry.input_quant is not None:
            acts[rel] = entry.input_quant
    if not acts:
        return out
    scales = calibrate_static(block, {rel: a for rel, a in acts.items() if not a.dynamic})
    return {rel: replace(qw, input_quant=acts.get(rel), input_scale=scales.get(rel)) if rel in acts else qw
            for rel, qw in out.items()}


@torch.no_grad()
def calibrate_static(block: Block, acts: dict[str, ActQuant]) -> dict[str, torch.Tensor]:
    """One static scale (float32 ``[1]``) per named linear of ``block``, by the observer its
    scheme names, over every calibration batch (observers that need two passes get two runs)."""
    if not acts:
        return {}
    if block.inputs is None:
        raise RuntimeError("static activation scales need calibration inputs")
    tokens = block.inputs.n_tokens
    observers = {rel: make_observer(act, tokens * block.linear(rel).in_features) for rel, act in acts.items()}
    for index in range(max(o.passes for o in observers.values())):
        def seen(name: str, x: torch.Tensor, index: int = index) -> None:
            observers[name].update(x, index)
        with block.capture_inputs(list(observers), seen):
            block.run()
    return {rel: o.scale() for rel, o in observers.items()}


@contextmanager
def simulated_inputs(module: nn.Module, out: dict[str, QuantizedWeight]) -> Iterator[bool]:
    """Within the ``with``, every linear of ``module`` named in ``out`` with an input scheme
    sees its input quantized and dequantized as the engine does (the block's next-block run);
    yields whether any does."""
    handles = []
    for rel, qw in out.items():
        act = qw.input_quant
        if act is None:
            continue

        def hook(_mod: nn.Module, args: tuple[Any, ...], act: ActQuant = act,
                 scale: torch.Tensor | None = qw.input_scale) -> tuple[Any, ...]:
            return (act.fake_quant(args[0], scale), *args[1:])
        handles.append(module.get_submodule(rel).register_forward_pre_hook(hook))
    try:
        yield bool(handles)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def calibrate_kv(block: Block, act: ActQuant | None, model: nn.Module | None) -> dict[str, torch.Tensor]:
    """The block's KV-cache scales (``max|k|`` / 448 over the keys after RoPE, and the same for
    the values, over every calibration token, with the block's quantized weights), attached to
    its attention module so that it simulates them from now on; returned as block extras
    (``<prefix>.<attention>.k_scale`` / ``v_scale``, float32 ``[1]``)."""
    if act is None:
        return {}
    if block.inputs is None or model is None:
        raise RuntimeError("KV-cache scales need calibration inputs and the run's model")
    enable(model)
    path = block.architecture.attention
    state = KVState(act, observing=True)
    attach(block.module.get_submodule(path), state)
    block.run()
    state.finish_observing()
    name = f"{block.prefix}.{path}"
    return {f"{name}.k_scale": state.k_scale, f"{name}.v_scale": state.v_scale}


def restore_kv(block: Block, extras: dict[str, torch.Tensor], model: nn.Module | None) -> None:
    """Put journaled KV-cache scales back on the block's attention module (a resumed run)."""
    path = block.architecture.attention
    name = f"{block.prefix}.{path}"
    if f"{name}.k_scale" not in extras:
        return
    if model is not None:
        enable(model)
    attention = block.module.get_submodule(path)
    state = state_of(attention) or KVState(ActQuant("fp8", dynamic=False))
    state.k_scale, state.v_scale = extras[f"{name}.k_scale"].float(), extras[f"{name}.v_scale"].float()
    attach(attention, state)

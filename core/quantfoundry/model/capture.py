"""Capture the inputs of the first decoder block, and the per-layer keyword arguments
(attention mask, rotary embeddings...) that the model passes to every block.

Every block is replaced by a pass-through *catcher* that records its keyword arguments; the
final norm raises to stop the forward there, so only the embeddings need real weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..roles.block import BlockInputs


class _StopForward(Exception):
    pass


class PassThroughBlock(nn.Module):
    """Stands in for a decoder block in the model's layer list: returns the hidden states it is
    called with; every other attribute is the wrapped block's (the model's loop reads some, e.g.
    a layer's attention type). For skipping blocks whose outputs are already known."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


class _Catcher(PassThroughBlock):
    """Stands in for one decoder block: records its call, returns the hidden states as they are."""

    def __init__(self, inner: nn.Module, index: int, store: dict[int, list[dict[str, Any]]],
                 first: list[torch.Tensor]):
        super().__init__(inner)
        self.index = index
        self._store = store
        self._first = first

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise RuntimeError("decoder blocks called with positional arguments beyond the hidden states "
                               "are not supported by the capture; register an architecture hook")
        if self.index == 0:
            self._first.append(hidden_states.detach())
        kwargs.pop("past_key_values", None)
        kwargs.pop("past_key_value", None)
        kwargs["use_cache"] = False
        self._store.setdefault(self.index, []).append(kwargs)
        return hidden_states


@torch.no_grad()
def capture_inputs(model: nn.Module, layers: nn.ModuleList, final_norm: nn.Module,
                   batches: list[torch.Tensor]) -> tuple[BlockInputs, dict[int, list[dict[str, Any]]]]:
    """Run the model's forward up to the final norm on each batch.

    :returns: the first block's inputs, and for each block index the list (one per batch) of
        keyword arguments it is called with.
    """
    store: dict[int, list[dict[str, Any]]] = {}
    first: list[torch.Tensor] = []
    originals = list(layers)
    for i, layer in enumerate(originals):
        layers[i] = _Catcher(layer, i, store, first)

    def stop(*_a: Any, **_k: Any) -> None:
        raise _StopForward

    handle = final_norm.register_forward_pre_hook(stop)
    try:
        for batch in batches:
            try:
                model(input_ids=batch, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
        for i, layer in enumerate(originals):
            layers[i] = layer
    kwargs0 = store.get(0, [])
    return BlockInputs(hidden=first, kwargs=kwargs0), store

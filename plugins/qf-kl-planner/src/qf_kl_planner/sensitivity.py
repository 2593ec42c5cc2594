"""Measuring how much output KL one tensor's rounding adds, with every other tensor in float.

:class:`Sensitivity` holds the float model and, from one reference pass over the calibration
batches, what every decoder block and the final norm read, and the reference next-token
log-probabilities. Changing a tensor of block ``b`` then reruns only the model from block ``b``
on (the blocks before it are skipped: their outputs are the stored inputs of ``b``); the output
head alone reruns from the final norm's stored input; the token embedding reruns everything.
The KL is ``KL(p_float || p_changed)`` per position, averaged over the calibration tokens.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from quantfoundry import Format, ModelSource
from quantfoundry.toolkit import PassThroughBlock
from torch import nn

HEAD = "head"
EMBEDDINGS = "embeddings"


def _replace_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class _Stop(Exception):
    pass


class Sensitivity:
    """The float ``model`` of ``source`` and its reference pass over ``batches`` (token ids
    ``[b, t]`` each, on the model's device).

    :param positions: the positions of each window whose next-token distribution is compared
        (the head runs on those only); ``None``: every position.
    :param importance: also collect the mean squared input per channel of every linear
        (llama.cpp's imatrix), for rounding candidates as an imatrix run does.
    """

    def __init__(self, model: nn.Module, source: ModelSource, batches: list[torch.Tensor], *,
                 positions: torch.Tensor | None = None, importance: bool = False):
        arch = source.architecture
        self.model = model.eval()
        self.source = source
        self.batches = batches
        self.positions = None if positions is None else positions.to(batches[0].device)
        self.layers: nn.ModuleList = model.get_submodule(arch.layers)
        self.norm = model.get_submodule(arch.final_norm)
        self.block_inputs: list[list[torch.Tensor]] = [[] for _ in self.layers]
        self.norm_inputs: list[torch.Tensor] = []
        self.reference: list[torch.Tensor] = []
        self.importance: dict[str, torch.Tensor] = {}
        self.runs = 0
        self._grams: dict[str, torch.Tensor] = {}
        self._gram_block: int | str | None = None
        self._reference_pass(importance)

    @torch.no_grad()
    def _reference_pass(self, importance: bool) -> None:
        handles = []
        for i, layer in enumerate(self.layers):
            handles.append(layer.register_forward_pre_hook(
                lambda _m, args, kwargs, i=i: self.block_inputs[i].append(_hidden_of(args, kwargs).detach()),
                with_kwargs=True))
        handles.append(self.norm.register_forward_pre_hook(
            lambda _m, args, kwargs: self.norm_inputs.append(_hidden_of(args, kwargs).detach()), with_kwargs=True))
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        if importance:
            for name, module in self.model.named_modules():
                if isinstance(module, nn.Linear):
                    def stat(_m: nn.Module, args: tuple, name: str = name) -> None:
                        x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
                        sums[name] = sums.get(name, 0) + (x * x).sum(0)
                        counts[name] = counts.get(name, 0) + x.shape[0]
                    handles.append(module.register_forward_pre_hook(stat))
        try:
            for ids in self.batches:
                self.reference.append(self._logprobs(ids))
        finally:
            for h in handles:
                h.remove()
        self.importance = {n: (s / counts[n]).cpu() for n, s in sums.items()}

    def _logprobs(self, ids: torch.Tensor) -> torch.Tensor:
        keep = {} if self.positions is None else {"logits_to_keep": self.positions}
        logits = self.model(input_ids=ids, use_cache=False, **keep).logits
        return torch.log_softmax(logits.to(torch.float32), dim=-1)

    @staticmethod
    def _kl(reference: torch.Tensor, logprobs: torch.Tensor) -> tuple[float, int]:
        """Summed KL(reference || changed) over the positions, and their count."""
        kl = (reference.exp() * (reference - logprobs)).sum(-1)
        return float(kl.sum()), kl.numel()

    @contextmanager
    def _from(self, start: int | str) -> Iterator[list[int]]:
        """The model set to rerun from ``start`` (a block index, ``HEAD`` or ``EMBEDDINGS``);
        yields a one-element list the caller sets to the batch index before each forward."""
        batch = [0]
        if start == EMBEDDINGS:
            yield batch
            return
        first = len(self.layers) if start == HEAD else int(start)
        originals = [self.layers[i] for i in range(first)]
        handles = []
        try:
            for i in range(first):
                self.layers[i] = PassThroughBlock(originals[i])
            if start == HEAD:
                handles.append(self.norm.register_forward_pre_hook(
                    lambda _m, args, kwargs: _replace_hidden(args, kwargs, self.norm_inputs[batch[0]]),
                    with_kwargs=True))
            else:
                handles.append(self.layers[first].register_forward_pre_hook(
                    lambda _m, args, kwargs: _replace_hidden(args, kwargs, self.block_inputs[first][batch[0]]),
                    with_kwargs=True))
            yield batch
        finally:
            for h in handles:
                h.remove()
            for i, module in enumerate(originals):
                self.layers[i] = module

    @torch.no_grad()
    def kl(self, start: int | str = EMBEDDINGS) -> float:
        """Mean KL(float || model as it is now) over the calibration tokens, rerunning the model
        from ``start`` (the earliest place a changed tensor is read)."""
        total, n = 0.0, 0
        with self._from(start) as batch:
            for b, ids in enumerate(self.batches):
                batch[0] = b
                s, c = self._kl(self.reference[b], self._logprobs(ids))
                total, n = total + s, n + c
        self.runs += 1
        return total / n

    def start_of(self, names: list[str]) -> int | str:
        """Where the model must rerun from when the weights of linears/embeddings ``names`` change."""
        arch = self.source.architecture
        starts: list[int | str] = []
        for name in names:
            index = self.source.block_index(f"{name}.")
            if index is not None:
                starts.append(index)
            elif name in arch.embeddings or self.tied_to_embeddings(name):
                starts.append(EMBEDDINGS)
            else:
                starts.append(HEAD)
        if EMBEDDINGS in starts:
            return EMBEDDINGS
        blocks = [s for s in starts if isinstance(s, int)]
        return min(blocks) if blocks else HEAD

    def tied_to_embeddings(self, name: str) -> bool:
        weight = self.model.get_submodule(name).weight
        return any(self.model.get_submodule(e).weight is weight for e in self.source.architecture.embeddings)

    @contextmanager
    def changed(self, formats: Mapping[str, Format]) -> Iterator[None]:
        """Each named tensor rounded to nearest on its format (with its importance, when
        collected) for the duration; restored bit-exactly after."""
        saved: dict[str, torch.Tensor] = {}
        try:
            for name, fmt in formats.items():
                weight = self.model.get_submodule(name).weight
                saved[name] = weight.data.clone()
                imp = self.importance.get(name)
                w = weight.data.to(torch.float32)
                rounded = fmt.quantize(w, None if imp is None else imp.to(w.device)).dequantize()
                weight.data.copy_(rounded.to(weight.dtype))
            yield
        finally:
            for name, data in saved.items():
                self.model.get_submodule(name).weight.data.copy_(data)

    @torch.no_grad()
    def gram(self, name: str) -> torch.Tensor:
        """``XᵀX / n`` (float32) of linear ``name``'s inputs on the calibration windows, from the
        model rerun up to the block that holds it (one block's worth kept at a time)."""
        start = self.start_of([name])
        if start == EMBEDDINGS:
            raise ValueError(f"{name} reads token ids, not activations: it has no Gram matrix")
        if self._gram_block != start:
            self._grams, self._gram_block = {}, start
            stop = self.model.get_submodule(self.source.architecture.lm_head) if start == HEAD \
                else self.layers[int(start)]
            keep = {"logits_to_keep": 1} if start != HEAD else \
                {} if self.positions is None else {"logits_to_keep": self.positions}
            prefix = "" if start == HEAD else f"{self.source.layer_prefix(int(start))}."
            counts: dict[str, int] = {}
            handles = []
            for full, module in self.model.named_modules():
                if isinstance(module, nn.Linear) and (full.startswith(prefix) if prefix else
                                                      self.source.block_index(f"{full}.") is None):
                    def stat(_m: nn.Module, args: tuple, full: str = full) -> None:
                        x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
                        self._grams[full] = self._grams.get(full, 0) + x.T @ x
                        counts[full] = counts.get(full, 0) + x.shape[0]
                    handles.append(module.register_forward_pre_hook(stat))

            def halt(*_: Any) -> None:
                raise _Stop
            handles.append(stop.register_forward_hook(halt))
            try:
                with self._from(start) as batch:
                    for b, ids in enumerate(self.batches):
                        batch[0] = b
                        try:
                            self.model(input_ids=ids, use_cache=False, **keep)
                        except _Stop:
                            pass
            finally:
                for h in handles:
                    h.remove()
            self._grams = {n: g / counts[n] for n, g in self._grams.items()}
        return self._grams[name]

    def output_error(self, name: str, fmt: Format) -> float:
        """``tr(δ G δᵀ)``: the mean squared change of linear ``name``'s outputs on the calibration
        inputs when its weight is rounded to nearest on ``fmt`` (``δ`` the weight's change)."""
        weight = self.model.get_submodule(name).weight.data.to(torch.float32)
        imp = self.importance.get(name)
        delta = fmt.quantize(weight, None if imp is None else imp.to(weight.device)).dequantize() - weight
        return float(((delta @ self.gram(name)) * delta).sum())

    def measure(self, formats: Mapping[str, Format]) -> float:
        """The KL the model adds with the named tensors (a unit chosen together) on ``formats``."""
        with self.changed(formats):
            return self.kl(self.start_of(list(formats)))

"""Observers: a static activation scale (:class:`~quantfoundry.ActQuant` with ``dynamic=False``)
calibrated from the inputs a linear sees in the block pass, streamed batch by batch.

=============  ===================================================================================
observer       scale
=============  ===================================================================================
``absmax``     ``max|x|`` over every calibration value, mapped onto the largest code
               (``max|x| / 127`` for int8, ``/ 448`` for fp8): nothing is clipped
``percentile`` the ``p``-th percentile of ``|x|`` (default 99.99) instead of the maximum: the few
               outliers above it are clipped, every other value gets a finer grid. The
               percentile is exact (no histogram): the ``n − ⌈n·p/100⌉ + 1`` largest ``|x|`` are
               kept, and the smallest of them is the value — numpy's ``inverted_cdf`` method
``mse``        the scale, among ``max|x| · (1 − i/grid) / qmax`` for ``i = 0 … maxshrink·grid``
               (``grid = 100``, ``maxshrink = 0.2``), whose fake-quantization error
               ``Σ |x − q(x)|^norm`` (``norm = 2.4``) over the calibration inputs is smallest —
               the grid search of llm-compressor's MSE observer; needs a second pass
=============  ===================================================================================

An observer sees ``passes`` passes over the same inputs (``update(x, pass_index)``), then gives
:meth:`Observer.scale` (float32 ``[1]``).
"""

from __future__ import annotations

import math

import torch

from ..roles.activation import ActQuant

MSE_GRID = 100
MSE_MAXSHRINK = 0.2
MSE_NORM = 2.4


class Observer:
    """Base: the running ``max|x|``."""

    passes = 1

    def __init__(self, act: ActQuant, n_values: int):
        self.act = act
        self.n_values = n_values
        self.absmax = torch.zeros((), dtype=torch.float32)

    def update(self, x: torch.Tensor, pass_index: int = 0) -> None:
        if pass_index == 0:
            self.absmax = torch.maximum(self.absmax.to(x.device), x.detach().abs().amax().float())

    def value(self) -> torch.Tensor:
        """The ``|x|`` the largest code is mapped onto."""
        return self.absmax

    def scale(self) -> torch.Tensor:
        return self.act.scale_for(self.value().reshape(1)).cpu()


class PercentileObserver(Observer):
    """The exact ``p``-th percentile of ``|x|`` from the largest values kept across batches."""

    def __init__(self, act: ActQuant, n_values: int):
        super().__init__(act, n_values)
        rank = math.ceil(n_values * act.percentile / 100)  # 1-based, ascending
        self.keep = max(1, n_values - max(rank, 1) + 1)
        self.top: torch.Tensor | None = None

    def update(self, x: torch.Tensor, pass_index: int = 0) -> None:
        super().update(x, pass_index)
        a = x.detach().abs().float().reshape(-1)
        if self.top is not None:
            a = torch.cat([self.top.to(a.device), a])
        self.top = torch.topk(a, min(self.keep, a.numel()), sorted=False).values

    def value(self) -> torch.Tensor:
        if self.top is None:
            return self.absmax
        return self.top.min()


class MSEObserver(Observer):
    """Pass 0: ``max|x|``; pass 1: the error of every candidate scale."""

    passes = 2

    def __init__(self, act: ActQuant, n_values: int):
        super().__init__(act, n_values)
        self.shrink = 1 - torch.arange(int(MSE_MAXSHRINK * MSE_GRID) + 1, dtype=torch.float32) / MSE_GRID
        self.errors = torch.zeros(self.shrink.numel(), dtype=torch.float64)

    def candidates(self) -> torch.Tensor:
        return self.act.scale_for(self.absmax.cpu() * self.shrink)

    def update(self, x: torch.Tensor, pass_index: int = 0) -> None:
        if pass_index == 0:
            super().update(x, pass_index)
            return
        flat = x.detach().float().reshape(-1)
        for i, s in enumerate(self.candidates().to(flat.device)):
            q = self.act.quantize(flat, s).float() * s
            self.errors[i] += float((flat - q).abs().pow(MSE_NORM).sum())

    def scale(self) -> torch.Tensor:
        return self.candidates()[int(torch.argmin(self.errors))].reshape(1)


def make_observer(act: ActQuant, n_values: int) -> Observer:
    """The observer ``act`` names, for a stream of ``n_values`` values in all."""
    if act.observer == "percentile":
        return PercentileObserver(act, n_values)
    if act.observer == "mse":
        return MSEObserver(act, n_values)
    return Observer(act, n_values)

"""The format ``e8p``: QuIP#'s E8P12 lattice codebook as a vector grid of QuantFoundry — 8
weights per 16-bit code (2 bits per weight), scaled by ``rms(w) / 1.03`` (:mod:`qf_quip.e8p`).

``e8p`` keeps one float32 scale per tensor, as QuIP# does (a per-tensor parameter,
:meth:`~quantfoundry.Format.fit_tensor`: 2.0 bits per weight plus 4 bytes); ``e8p-row`` one
per row (2 + 32 / in_features bits per weight), which follows each row's own magnitude. The scale
makes the weights' root mean square 1.03, the codebook's own scale in QuIP# for the Gaussian-like
weights its incoherence processing produces. Codes round to the nearest point exactly
(:func:`qf_quip.e8p.nearest`); any quantizer that drives vector formats (RTN, the core's LDLQ
loop — QuIP#'s BlockLDLQ) rounds onto it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from quantfoundry import Format, Options, Params

from . import e8p


@dataclass(frozen=True, kw_only=True)
class E8POptions(Options):
    scale: str = field(default="tensor", metadata={"help": "tensor: one scale per weight (QuIP#); row: one per row"})

    def __post_init__(self) -> None:
        if self.scale not in ("tensor", "row"):
            raise ValueError(f"scale must be 'tensor' or 'row', got {self.scale!r}")


def _scale_of(w: torch.Tensor) -> torch.Tensor:
    """``rms / 1.03`` over the last dimension (float32, kept)."""
    return w.float().square().mean(-1, keepdim=True).sqrt() / e8p.OPT_SCALE


class E8PFormat(Format):
    name = "e8p"
    description = "QuIP#'s E8P12 lattice codebook: 8 weights per 16-bit code (2 bits/weight), rms scale"
    Options = E8POptions
    block_width = 8
    examples = ("e8p", "e8p-row")

    options: E8POptions

    @property
    def spec(self) -> str:
        return self.name + ("-row" if self.options.scale == "row" else "")

    @classmethod
    def from_spec(cls, spec: str) -> E8POptions | None:
        m = re.fullmatch(r"e8p(-row)?", spec.strip().lower().replace("_", "-"))
        return None if m is None else E8POptions(scale="row" if m.group(1) else "tensor")

    @classmethod
    def spec_help(cls) -> str:
        return "e8p[-row] (QuIP#'s E8P12 codebook, 2 bits/weight; -row: a scale per row instead of per tensor)"

    def group_size(self, in_features: int) -> int:
        return in_features

    def code_bits(self) -> int:
        return 16

    # -- numerics --------------------------------------------------------------------------
    def fit_tensor(self, w: torch.Tensor) -> Params:
        if self.options.scale != "tensor":
            return {}
        return {"scale": _scale_of(w.reshape(1, -1)).reshape(1)}

    def tensor_view(self, tensor_params: Params, shape: tuple[int, int]) -> Params:
        if not tensor_params:
            return {}
        return {"_scale": tensor_params["scale"].view(1, 1).expand(shape[0], 1)}

    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None, view: Params | None = None) -> Params:
        if self.options.scale == "row":
            return {"scale": _scale_of(w)}
        if view is None:  # w is the whole weight
            return self.tensor_view(self.fit_tensor(w), tuple(w.shape))
        return {}

    @staticmethod
    def _scale(params: Params) -> torch.Tensor:
        return params["_scale"] if "_scale" in params else params["scale"]

    def round(self, w: torch.Tensor, params: Params, col0: int = 0) -> torch.Tensor:
        s = self._scale(params).to(w.device)
        x = w.float() / torch.where(s > 0, s, torch.ones_like(s))  # an all-zero weight: any code, times 0
        rows, cols = x.shape
        return e8p.nearest(x.reshape(-1, 8)).view(rows, cols // 8)

    def decode(self, codes: torch.Tensor, params: Params, col0: int = 0) -> torch.Tensor:
        rows, n = codes.shape
        return e8p.decode(codes).reshape(rows, n * 8) * self._scale(params).to(codes.device)

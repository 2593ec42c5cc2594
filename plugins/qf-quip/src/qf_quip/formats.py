"""The formats ``e8p`` and ``e8p-rvq4``: QuIP#'s E8P12 lattice codebook as a vector grid of
QuantFoundry — 8 weights per 16-bit code (2 bits per weight), scaled by ``rms(w) / 1.03``
(:mod:`qf_quip.e8p`) — and its 4-bit residual form (QuIP#'s ``E8P12RVQ4B``): the nearest E8P
point, then the nearest E8P point to the remainder scaled up by 3.45, the code ``c1 · 2^16 + c2``
decoding to ``E8P[c1] + E8P[c2] / 3.45`` (32 bits per 8 weights).

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


#: QuIP#'s residual scale of ``E8P12RVQ4B`` (``opt_resid_scale``)
RESID_SCALE = 1 / 3.45


@dataclass(frozen=True, kw_only=True)
class E8POptions(Options):
    scale: str = field(default="tensor", metadata={"help": "tensor: one scale per weight (QuIP#); row: one per row"})
    stages: int = field(default=1, metadata={"help": "1: E8P (2 bits/weight); 2: E8P + E8P residual (4 bits/weight)"})

    def __post_init__(self) -> None:
        if self.scale not in ("tensor", "row"):
            raise ValueError(f"scale must be 'tensor' or 'row', got {self.scale!r}")
        if self.stages not in (1, 2):
            raise ValueError(f"stages must be 1 (e8p) or 2 (e8p-rvq4), got {self.stages}")


def _scale_of(w: torch.Tensor) -> torch.Tensor:
    """``rms / 1.03`` over the last dimension (float32, kept)."""
    return w.float().square().mean(-1, keepdim=True).sqrt() / e8p.OPT_SCALE


class E8PFormat(Format):
    name = "e8p"
    description = "QuIP#'s E8P12 lattice codebook: 8 weights per 16-bit code (2 bits/weight), rms scale"
    Options = E8POptions
    block_width = 8
    examples = ("e8p", "e8p-row", "e8p-rvq4")

    options: E8POptions

    @property
    def spec(self) -> str:
        return self.name + ("-rvq4" if self.options.stages == 2 else "") + ("-row" if self.options.scale == "row" else "")

    @classmethod
    def from_spec(cls, spec: str) -> E8POptions | None:
        m = re.fullmatch(r"e8p(-rvq4)?(-row)?", spec.strip().lower().replace("_", "-"))
        if m is None:
            return None
        return E8POptions(scale="row" if m.group(2) else "tensor", stages=2 if m.group(1) else 1)

    @classmethod
    def spec_help(cls) -> str:
        return ("e8p[-rvq4][-row] (QuIP#'s E8P12 codebook, 2 bits/weight; -rvq4: with an E8P residual, 4 bits; "
                "-row: a scale per row instead of per tensor)")

    def group_size(self, in_features: int) -> int:
        return in_features

    def code_bits(self) -> int:
        return 16 * self.options.stages

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        if self.options.stages == 1:
            return super().pack(codes)
        c = codes.reshape(-1).to(torch.int64)
        return torch.where(c >= 2**31, c - 2**32, c).to(torch.int32).view(torch.uint8)  # little-endian words

    def unpack(self, packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        if self.options.stages == 1:
            return super().unpack(packed, shape)
        rows, cols = shape
        return (packed.view(torch.int32).to(torch.int64) & 0xFFFFFFFF).view(rows, cols // 8)

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
        v = x.reshape(-1, 8)
        first = e8p.nearest(v)
        if self.options.stages == 1:
            return first.view(rows, cols // 8)
        second = e8p.nearest((v - e8p.decode(first)) / RESID_SCALE)
        return ((first.to(torch.int64) << 16) | second.to(torch.int64)).view(rows, cols // 8)

    def decode(self, codes: torch.Tensor, params: Params, col0: int = 0) -> torch.Tensor:
        rows, n = codes.shape
        c = codes.to(torch.int64)
        v = e8p.decode(c >> 16) + e8p.decode(c & 0xFFFF) * RESID_SCALE if self.options.stages == 2 else e8p.decode(c)
        return v.reshape(rows, n * 8) * self._scale(params).to(codes.device)

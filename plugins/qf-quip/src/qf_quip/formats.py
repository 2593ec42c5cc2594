"""The formats ``e8p``, ``e8p-rvq3`` and ``e8p-rvq4``: QuIP#'s E8P12 lattice codebook as a vector
grid of QuantFoundry — 8 weights per 16-bit code (2 bits per weight), scaled by ``rms(w) / 1.03``
(:mod:`qf_quip.e8p`) — and its residual forms: the nearest E8P point, then the nearest point of a
second codebook to the remainder scaled up, the code ``c1 · 2^b + c2`` decoding to
``E8P[c1] + second[c2] · r``:

* ``e8p-rvq3`` (QuIP#'s ``E8P12RVQ3B``): the 1-bit E8 codebook second (256 points, 8 bits),
  ``r = 1 / 2.04``, scale ``rms / 0.98``; 24 bits per 8 weights;
* ``e8p-rvq4`` (``E8P12RVQ4B``): E8P again second, ``r = 1 / 3.45``, scale ``rms / 1.03``; 32 bits.

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

#: per bit width: QuIP#'s codebook scale (``opt_scale``), residual scale (``opt_resid_scale``)
#: and the second stage's code bits
CODEBOOKS = {2: (e8p.OPT_SCALE, 0.0, 0), 3: (0.98, 1 / 2.04, 8), 4: (1.03, 1 / 3.45, 16)}


@dataclass(frozen=True, kw_only=True)
class E8POptions(Options):
    scale: str = field(default="tensor", metadata={"help": "tensor: one scale per weight (QuIP#); row: one per row"})
    bits: int = field(default=2, metadata={"help": "2: E8P; 3: E8P + 1-bit E8 residual; 4: E8P + E8P residual"})

    def __post_init__(self) -> None:
        if self.scale not in ("tensor", "row"):
            raise ValueError(f"scale must be 'tensor' or 'row', got {self.scale!r}")
        if self.bits not in CODEBOOKS:
            raise ValueError(f"bits must be 2 (e8p), 3 (e8p-rvq3) or 4 (e8p-rvq4), got {self.bits}")


def _scale_of(w: torch.Tensor, opt_scale: float) -> torch.Tensor:
    """``rms / opt_scale`` over the last dimension (float32, kept)."""
    return w.float().square().mean(-1, keepdim=True).sqrt() / opt_scale


class E8PFormat(Format):
    name = "e8p"
    description = "QuIP#'s E8P12 lattice codebook: 8 weights per 16-bit code (2 bits/weight), rms scale"
    Options = E8POptions
    block_width = 8
    examples = ("e8p", "e8p-row", "e8p-rvq3", "e8p-rvq4")

    options: E8POptions

    @property
    def spec(self) -> str:
        b = self.options.bits
        return self.name + (f"-rvq{b}" if b > 2 else "") + ("-row" if self.options.scale == "row" else "")

    @classmethod
    def from_spec(cls, spec: str) -> E8POptions | None:
        m = re.fullmatch(r"e8p(?:-rvq([34]))?(-row)?", spec.strip().lower().replace("_", "-"))
        if m is None:
            return None
        return E8POptions(scale="row" if m.group(2) else "tensor", bits=int(m.group(1) or 2))

    @classmethod
    def spec_help(cls) -> str:
        return ("e8p[-rvq3|-rvq4][-row] (QuIP#'s E8P12 codebook, 2 bits/weight; -rvq3/-rvq4: with a residual "
                "stage, 3/4 bits; -row: a scale per row instead of per tensor)")

    def group_size(self, in_features: int) -> int:
        return in_features

    def code_bits(self) -> int:
        return 8 * self.options.bits

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        """Each code as ``bits`` little-endian bytes (2, 3 or 4 per 8 weights)."""
        if self.options.bits == 2:
            return super().pack(codes)
        c = codes.reshape(-1).to(torch.int64)
        shifts = torch.arange(self.options.bits, device=c.device) * 8
        return ((c[:, None] >> shifts) & 0xFF).to(torch.uint8).reshape(-1)

    def unpack(self, packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        if self.options.bits == 2:
            return super().unpack(packed, shape)
        rows, cols = shape
        nbytes = self.options.bits
        shifts = torch.arange(nbytes, device=packed.device) * 8
        data = packed[: rows * (cols // 8) * nbytes].view(-1, nbytes).to(torch.int64)
        return (data << shifts).sum(-1).view(rows, cols // 8)

    # -- numerics --------------------------------------------------------------------------
    def fit_tensor(self, w: torch.Tensor) -> Params:
        if self.options.scale != "tensor":
            return {}
        return {"scale": _scale_of(w.reshape(1, -1), CODEBOOKS[self.options.bits][0]).reshape(1)}

    def tensor_view(self, tensor_params: Params, shape: tuple[int, int]) -> Params:
        if not tensor_params:
            return {}
        return {"_scale": tensor_params["scale"].view(1, 1).expand(shape[0], 1)}

    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None, view: Params | None = None) -> Params:
        if self.options.scale == "row":
            return {"scale": _scale_of(w, CODEBOOKS[self.options.bits][0])}
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
        _, resid, shift = CODEBOOKS[self.options.bits]
        if not shift:
            return first.view(rows, cols // 8)
        rest = (v - e8p.decode(first)) / resid
        second = e8p.nearest(rest) if shift == 16 else e8p.nearest_e81b(rest)
        return ((first.to(torch.int64) << shift) | second.to(torch.int64)).view(rows, cols // 8)

    def decode(self, codes: torch.Tensor, params: Params, col0: int = 0) -> torch.Tensor:
        rows, n = codes.shape
        c = codes.to(torch.int64)
        _, resid, shift = CODEBOOKS[self.options.bits]
        if not shift:
            v = e8p.decode(c)
        else:
            second = e8p.decode(c & 0xFFFF) if shift == 16 else e8p.e81b_table(c.device)[c & 0xFF]
            v = e8p.decode(c >> shift) + second * resid
        return v.reshape(rows, n * 8) * self._scale(params).to(codes.device)

"""Run-time weight transforms: maps between a linear's original weight and the weight its codes
store, applied when the linear runs because they cannot be folded into a neighbouring layer
(data model v2: ``QuantizedWeight.transforms``).

A transform ``T`` stores ``W_s = T(W)``; it gives back the original weight (:meth:`to_dense`), and
runs the linear on the stored weight: ``y = x Wᵀ = apply_output(apply_input(x) · W_sᵀ)``. A
:class:`~quantfoundry.QuantizedWeight` holds them in order (the first applied to the original
weight first), and ``perm`` (act-order) after them all. Exporters say which kinds they store
(:attr:`~quantfoundry.Exporter.stores_transforms`), quantizers which they make
(:meth:`~quantfoundry.Quantizer.makes_transforms`), kernels how they run them
(:attr:`~quantfoundry.Kernel.weight_transforms`) — all checked before any work.

Kinds (:data:`KINDS`): ``rht``, QuIP#'s randomized Hadamard transform on both sides,
``W_s = Q_out W Q_inᵀ`` with ``Q = H · diag(s) / √n`` (:mod:`quantfoundry.toolkit.hadamard`),
its sign vectors stored as bits.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from .bits import pack_bits, unpack_bits


class WeightTransform(ABC):
    """Base class of the transform kinds (see the module docstring)."""

    kind: ClassVar[str]

    @abstractmethod
    def to_dense(self, w: torch.Tensor) -> torch.Tensor:
        """The original weight ``[out, in]`` from the stored one (float32 or float64)."""

    @abstractmethod
    def from_dense(self, w: torch.Tensor) -> torch.Tensor:
        """The weight to store from the original one (the inverse of :meth:`to_dense`)."""

    @abstractmethod
    def apply_input(self, x: torch.Tensor) -> torch.Tensor:
        """The linear's input ``[..., in]`` as the stored weight reads it."""

    @abstractmethod
    def apply_output(self, y: torch.Tensor) -> torch.Tensor:
        """The stored weight's output ``[..., out]`` as the original weight's."""

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """What is stored (named tensors)."""

    @abstractmethod
    def to_json(self) -> dict[str, Any]:
        """``{"kind": …}`` and the scalars that, with :meth:`tensors`, rebuild it."""

    @classmethod
    @abstractmethod
    def from_stored(cls, info: dict[str, Any], tensors: dict[str, torch.Tensor]) -> WeightTransform:
        """Rebuild from :meth:`to_json` and :meth:`tensors`."""

    def to(self, device: torch.device | str) -> WeightTransform:
        return type(self).from_stored(self.to_json(), {k: v.to(device) for k, v in self.tensors().items()})

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


class HadamardTransform(WeightTransform):
    """``W_s = Q_out W Q_inᵀ``, ``Q = H · diag(s) / √n`` on either side (a side without signs is
    the identity). Signs are kept as packed bits (bit set: −1), ``in_n`` and ``out_n`` long.

    A side may instead hold a real vector ``s`` (``in_scale`` / ``out_scale``, float16 as QuIP#
    stores its fine-tuned ``SU`` / ``SV``): the linear still runs ``y = apply_output(apply_input(x)
    · W_sᵀ)`` with ``apply_input(x) = H (s ⊙ x) / √n`` and ``apply_output(y) = s ⊙ Hᵀ y / √n``;
    ``to_dense`` is that map's matrix and ``from_dense`` its inverse (``1 / s``) — no longer
    orthogonal, so such transforms come from fine-tuning a quantized weight (:meth:`with_scales`),
    not from rounding through them."""

    kind = "rht"

    def __init__(self, in_bits: torch.Tensor | None, in_n: int, out_bits: torch.Tensor | None, out_n: int,
                 seed: int | None = None, *, in_scale: torch.Tensor | None = None,
                 out_scale: torch.Tensor | None = None) -> None:
        self.in_bits, self.in_n, self.out_bits, self.out_n, self.seed = in_bits, in_n, out_bits, out_n, seed
        self.in_scale, self.out_scale = in_scale, out_scale
        self._maps: dict[str, Any] = {}

    def with_scales(self, in_scale: torch.Tensor | None, out_scale: torch.Tensor | None) -> HadamardTransform:
        """This transform with real vectors in place of the signs (stored as float16; ``None``
        keeps a side as it is)."""
        def half(v: torch.Tensor | None) -> torch.Tensor | None:
            return None if v is None else v.detach().to(torch.float16)
        in_s, out_s = half(in_scale), half(out_scale)
        return HadamardTransform(None if in_s is not None else self.in_bits, self.in_n,
                                 None if out_s is not None else self.out_bits, self.out_n, self.seed,
                                 in_scale=in_s if in_s is not None else self.in_scale,
                                 out_scale=out_s if out_s is not None else self.out_scale)

    @classmethod
    def random(cls, shape: tuple[int, int], seed: int, *, inputs: bool = True,
               outputs: bool = True) -> HadamardTransform:
        """Signs from ``seed`` (input side from ``2·seed``, output side from ``2·seed + 1``)."""
        from ..hadamard import random_signs

        out_n, in_n = shape
        bits = {side: (random_signs(n, 2 * seed + k) < 0).to(torch.uint8) if on else None
                for side, n, k, on in (("in", in_n, 0, inputs), ("out", out_n, 1, outputs))}
        return cls(_pack(bits["in"]), in_n, _pack(bits["out"]), out_n, seed)

    @classmethod
    def with_input_signs(cls, like: HadamardTransform, rows: int, seed: int) -> HadamardTransform:
        """Another weight's transform reading the same input (the same input signs), with its
        own output signs — linears sharing one input share ``Q_in``."""
        out = cls.random((rows, like.in_n), seed, inputs=False)
        out.in_bits = None if like.in_bits is None else like.in_bits.clone()  # stored once per weight
        return out

    def signs(self, side: str) -> torch.Tensor | None:
        """The sign vector (float32 ±1; the real vector where fine-tuned) of ``side`` (``"in"`` or
        ``"out"``), ``None`` where that side is the identity — for kernels that run the transform
        themselves."""
        q = self._map(side)
        return None if q is None else q.signs

    def _map(self, side: str, inverse: bool = False) -> Any:
        from ..hadamard import RandomHadamard

        bits, scale, n = ((self.in_bits, self.in_scale, self.in_n) if side == "in"
                          else (self.out_bits, self.out_scale, self.out_n))
        if bits is None and scale is None:
            return None
        key = f"{side}:{inverse}:{(bits if scale is None else scale).device}"
        if key not in self._maps:
            s = 1.0 - 2.0 * _unpack(bits, n).to(torch.float32) if scale is None else scale.to(torch.float32)
            self._maps[key] = RandomHadamard(1.0 / s if inverse and scale is not None else s)
        return self._maps[key]

    def to_dense(self, w: torch.Tensor) -> torch.Tensor:
        q_in, q_out = self._map("in"), self._map("out")
        if q_in is not None:
            w = q_in.apply_t(w)                 # W_s Q_in
        if q_out is not None:
            w = q_out.apply_t(w.T).T            # Q_outᵀ (W_s Q_in)
        return w

    def from_dense(self, w: torch.Tensor) -> torch.Tensor:
        q_in, q_out = self._map("in", inverse=True), self._map("out", inverse=True)
        if q_in is not None:
            w = q_in.apply(w)                   # W Q_inᵀ
        if q_out is not None:
            w = q_out.apply(w.T).T              # Q_out (W Q_inᵀ)
        return w

    def hessian(self, h: torch.Tensor) -> torch.Tensor:
        """The input Hessian as the stored weight sees it: ``Q_in H Q_inᵀ``."""
        q_in = self._map("in")
        return h if q_in is None else q_in.apply(q_in.apply(h).T).T

    def apply_input(self, x: torch.Tensor) -> torch.Tensor:
        q_in = self._map("in")
        return x if q_in is None else q_in.apply(x)

    def apply_output(self, y: torch.Tensor) -> torch.Tensor:
        q_out = self._map("out")
        return y if q_out is None else q_out.apply_t(y)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in (("in_signs", self.in_bits), ("out_signs", self.out_bits),
                                  ("in_scale", self.in_scale), ("out_scale", self.out_scale)) if v is not None}

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_n": self.in_n, "out_n": self.out_n, "seed": self.seed}

    @classmethod
    def from_stored(cls, info: dict[str, Any], tensors: dict[str, torch.Tensor]) -> HadamardTransform:
        return cls(tensors.get("in_signs"), int(info["in_n"]), tensors.get("out_signs"), int(info["out_n"]),
                   info.get("seed"), in_scale=tensors.get("in_scale"), out_scale=tensors.get("out_scale"))


def _pack(bits: torch.Tensor | None) -> torch.Tensor | None:
    return None if bits is None else pack_bits(bits, 1)


def _unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    return unpack_bits(packed, 1, n)


#: the transform kinds a stored artifact may hold, by name
KINDS: dict[str, type[WeightTransform]] = {HadamardTransform.kind: HadamardTransform}


def transform_from_stored(info: dict[str, Any], tensors: dict[str, torch.Tensor]) -> WeightTransform:
    kind = info.get("kind")
    if kind not in KINDS:
        raise ValueError(f"unknown weight transform kind {kind!r}; this QuantFoundry knows {sorted(KINDS)}")
    return KINDS[kind].from_stored(info, tensors)

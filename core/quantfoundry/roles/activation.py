"""ActQuant: how a tensor computed at run time — a linear's input, the KV cache — is quantized
by the engine that serves the model (data model v2).

Two number formats, both symmetric — ``int8`` (codes ``−128 … 127``, round half to even,
saturating: ``cvt.rni.sat.s8``) and ``fp8`` (``float8_e4m3fn``: clamp to ``±448``, then the
cast, round to nearest even) — with the value ``code · s``, and two ways to get the scale
``s``, computed exactly as vLLM's kernels compute them (float32):

=================  =========================================  ======================================
scheme             scale                                      code
=================  =========================================  ======================================
int8, per token    ``s = max|x| / 127`` per row               ``int8(x · (127 / max|x|))``; a zero
                   (``dynamic_scaled_int8_quant``)            row gives codes 0
int8, static       calibrated ``s`` (``input_scale``)         ``int8(x / s)``
fp8, per token     ``s = max(max|x| / 448, 1 / (448 · 512))``  ``fp8(clamp(x / s))``
                   (``dynamic_per_token_scaled_fp8_quant``)
fp8, static        calibrated ``s``                           ``fp8(clamp(x · (1 / s)))``
=================  =========================================  ======================================

A static scale is calibrated before deployment by an observer over the calibration inputs
(:mod:`quantfoundry.toolkit.observers`: ``absmax``, ``percentile`` or ``mse``), stored beside
the weight (``input_scale``) and used for every token.

:meth:`ActQuant.fake_quant` is the simulation every evaluator measures: the values the engine's
integer/fp8 GEMM multiplies, in float.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import torch

QMAX = {"int8": 127.0, "fp8": 448.0}
#: vLLM's floor for a dynamic fp8 scale (``1 / (FP8_MAX · 512)``): an all-zero token stays finite
FP8_MIN_SCALE = 1.0 / (448.0 * 512.0)
OBSERVERS = ("absmax", "percentile", "mse")
_SPEC = re.compile(r"^(int8|fp8)(-static)?$")


def _const(value: float, like: torch.Tensor) -> torch.Tensor:
    """``value`` as a 0-d tensor on ``like``'s device: ``t / _const(c, t)`` is IEEE division on
    every device (CUDA turns division by a Python number into a multiplication by its reciprocal,
    one ulp off for some inputs)."""
    return torch.tensor(value, dtype=torch.float32, device=like.device)


@dataclass(frozen=True)
class ActQuant:
    """The scheme of one run-time tensor.

    :param dtype: ``int8`` or ``fp8`` (e4m3).
    :param dynamic: per-token scales computed at run time (``True``), or one static per-tensor
        scale calibrated in the block pass (``False``).
    :param observer: how a static scale is calibrated (``absmax``, ``percentile``, ``mse``).
    :param percentile: the ``percentile`` observer's quantile of ``|x|``, in percent.
    """

    dtype: Literal["int8", "fp8"]
    dynamic: bool = True
    observer: Literal["absmax", "percentile", "mse"] = "absmax"
    percentile: float = 99.99

    def __post_init__(self) -> None:
        if self.dtype not in QMAX:
            raise ValueError(f"activation dtype must be int8 or fp8, got {self.dtype!r}")
        if self.observer not in OBSERVERS:
            raise ValueError(f"observer must be one of {', '.join(OBSERVERS)}, got {self.observer!r}")
        if not 0 < self.percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")

    # -- identity ------------------------------------------------------------------------
    @classmethod
    def from_spec(cls, spec: str, observer: str = "absmax", percentile: float = 99.99) -> ActQuant:
        """``int8`` | ``int8-static`` | ``fp8`` | ``fp8-static`` (dynamic per token unless static)."""
        m = _SPEC.match(spec.strip().lower())
        if m is None:
            raise ValueError(f"unknown activation scheme {spec!r}: use int8, int8-static, fp8 or fp8-static")
        return cls(m.group(1), dynamic=m.group(2) is None, observer=observer, percentile=percentile)  # type: ignore[arg-type]

    @property
    def spec(self) -> str:
        return self.dtype if self.dynamic else f"{self.dtype}-static"

    @property
    def granularity(self) -> Literal["token", "tensor"]:
        return "token" if self.dynamic else "tensor"

    @property
    def qmax(self) -> float:
        return QMAX[self.dtype]

    def describe(self) -> str:
        how = "dynamic per-token scales" if self.dynamic else f"one static scale per tensor ({self.observer} observer)"
        return f"{self.dtype} {'(e4m3) ' if self.dtype == 'fp8' else ''}symmetric, {how}"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"spec": self.spec, "dtype": self.dtype, "dynamic": self.dynamic,
                               "granularity": self.granularity}
        if not self.dynamic:
            out["observer"] = self.observer
            if self.observer == "percentile":
                out["percentile"] = self.percentile
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ActQuant:
        return cls(data["dtype"], dynamic=bool(data["dynamic"]), observer=data.get("observer", "absmax"),
                   percentile=float(data.get("percentile", 99.99)))

    # -- numerics ------------------------------------------------------------------------
    def scale_for(self, absmax: torch.Tensor) -> torch.Tensor:
        """The scale (float32) that maps ``absmax`` onto the largest code, with the engines'
        guards (fp8: vLLM's floor; int8: 1 where ``absmax`` is 0)."""
        a = absmax.float()
        if self.dtype == "fp8":
            return torch.clamp(a / _const(448.0, a), min=FP8_MIN_SCALE)
        return torch.where(a > 0, a / _const(127.0, a), torch.ones_like(a))

    def dynamic_scale(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token scales ``[..., 1]`` (float32) of ``x`` ``[..., in]``."""
        return self.scale_for(x.detach().abs().amax(dim=-1, keepdim=True))

    def _codes(self, y: torch.Tensor) -> torch.Tensor:
        if self.dtype == "fp8":
            return y.clamp_(-448.0, 448.0).to(torch.float8_e4m3fn)
        return torch.round(y).clamp_(-128, 127).to(torch.int8)

    def quantize(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Codes (``int8`` or ``float8_e4m3fn``) of ``x`` on a static ``scale`` (broadcast), as
        the engine computes them: int8 divides by the scale, fp8 multiplies by its reciprocal."""
        s = scale.float().to(x.device)
        return self._codes(x.float() * torch.reciprocal(s) if self.dtype == "fp8" else x.float() / s)

    def quantize_dynamic(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token codes and scales ``[..., 1]`` of ``x``, as the engine computes them."""
        absmax = x.detach().float().abs().amax(dim=-1, keepdim=True)
        if self.dtype == "fp8":
            scale = self.scale_for(absmax)
            return self._codes(x.float() / scale), scale
        inv = torch.where(absmax > 0, _const(127.0, absmax) / absmax, torch.zeros_like(absmax))
        return self._codes(x.float() * inv), absmax / _const(127.0, absmax)

    def fake_quant(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """What the engine multiplies, in ``x``'s dtype: ``x`` quantized with ``scale`` (static)
        or with its per-token scales (dynamic; ``scale`` is then ignored), then dequantized."""
        if self.dynamic:
            codes, scale = self.quantize_dynamic(x)
        elif scale is None:
            raise ValueError(f"the static activation scheme {self.spec} needs its calibrated scale")
        else:
            codes = self.quantize(x, scale)
            scale = scale.float().to(x.device)
        return (codes.float() * scale).to(x.dtype)

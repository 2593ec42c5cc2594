"""Built-in format ``fp8-e4m3``: weights as float8 e4m3 (``torch.float8_e4m3fn``) times a scale
per output channel, or one scale for the whole tensor — the weights of FP8 W8A8 (vLLM's
``float-quantized`` compressed-tensors checkpoints).

Spec syntax: ``fp8-e4m3[-tensor][-sf16|-sbf16]`` — ``fp8-e4m3`` (a scale per output channel),
``fp8-e4m3-tensor`` (one scale, a per-tensor parameter of the data model v2). Scales are
float32 unless ``-sf16`` / ``-sbf16``.

Grid (float32 arithmetic): ``scale = max|w| / 448`` over the row (or the tensor), rounded to
its storage dtype (a row of zeros gets 1); the code is ``fp8(clamp(w / scale, −448, 448))`` —
torch's float8 cast, round to nearest even (saturating: the clamp keeps a value that the
scale's rounding pushed past 448 finite) — stored as its byte; the value is
``float(code) · scale``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..hookspecs import hookimpl
from ..options import Options
from ..roles.format import Format, Params

FP8_MAX = 448.0
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_SUFFIX = {"float16": "-sf16", "bfloat16": "-sbf16", "float32": ""}
_SPEC = re.compile(r"^fp8(?:-e4m3)?(-tensor)?(-sf16|-sbf16|-sf32)?$")


@dataclass(frozen=True, kw_only=True)
class FP8Options(Options):
    per_tensor: bool = field(default=False, metadata={"help": "one scale for the whole tensor (else one per row)"})
    scale_dtype: Literal["float32", "float16", "bfloat16"] = field(
        default="float32", metadata={"help": "storage dtype of the scales"})


def _scale(absmax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``absmax / 448`` (a tensor division: the same bits on CPU and CUDA), 1 where 0, in ``dtype``."""
    s = absmax.float() / torch.full_like(absmax, FP8_MAX, dtype=torch.float32)
    s = torch.where(s == 0, torch.ones_like(s), s)
    return s.clamp(min=torch.finfo(dtype).tiny, max=torch.finfo(dtype).max).to(dtype)


class FP8Format(Format):
    name = "fp8-e4m3"
    description = "float8 e4m3 weights with a scale per output channel or per tensor (FP8 W8A8)"
    Options = FP8Options
    examples = ("fp8-e4m3", "fp8-e4m3-tensor")

    options: FP8Options

    @property
    def spec(self) -> str:
        return "fp8-e4m3" + ("-tensor" if self.options.per_tensor else "") + _SUFFIX[self.options.scale_dtype]

    @classmethod
    def from_spec(cls, spec: str) -> FP8Options | None:
        m = _SPEC.match(spec.strip().lower().replace("_", "-"))
        if m is None:
            return None
        sdt = {"-sf16": "float16", "-sbf16": "bfloat16"}.get(m.group(2) or "", "float32")
        return FP8Options(per_tensor=bool(m.group(1)), scale_dtype=sdt)  # type: ignore[arg-type]

    @classmethod
    def spec_help(cls) -> str:
        return "fp8-e4m3[-tensor][-sf16|-sbf16] (a scale per output channel, or one per tensor)"

    def group_size(self, in_features: int) -> int:
        return in_features

    def code_bits(self) -> int:
        return 8

    # -- numerics ------------------------------------------------------------------------
    def fit_tensor(self, w: torch.Tensor) -> Params:
        if not self.options.per_tensor:
            return {}
        return {"scale": _scale(w.abs().amax().reshape(1), _DTYPES[self.options.scale_dtype])}

    def tensor_view(self, tensor_params: Params, shape: tuple[int, int]) -> Params:
        if not self.options.per_tensor:
            return {}
        return {"_scale": tensor_params["scale"].reshape(1, 1).expand(shape[0], 1)}

    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None, view: Params | None = None) -> Params:
        if self.options.per_tensor:
            if view is not None:
                return {}
            return self.tensor_view(self.fit_tensor(w), tuple(w.shape))
        return {"scale": _scale(w.abs().amax(dim=1, keepdim=True), _DTYPES[self.options.scale_dtype])}

    def _scales(self, params: Params) -> torch.Tensor:
        return (params["_scale"] if self.options.per_tensor else params["scale"]).to(torch.float32)

    def round(self, w: torch.Tensor, params: Params, col0: int = 0) -> torch.Tensor:
        y = w.to(torch.float32) / self._scales(params)
        return y.clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)

    def decode(self, codes: torch.Tensor, params: Params, col0: int = 0) -> torch.Tensor:
        return codes.to(torch.uint8).view(torch.float8_e4m3fn).to(torch.float32) * self._scales(params)


@hookimpl
def qf_register_formats(register):
    register(FP8Format)

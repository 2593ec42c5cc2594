"""Choosing a kernel for a quantized tensor and swapping linears for QuantLinear modules."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import IncompatiblePlanError
from ..plugins import get_plugin_manager
from ..roles.format import Format, QuantizedWeight
from ..roles.kernel import Kernel, QuantLinear


def select_kernels(fmt: Format, device: torch.device, name: str | None = None,
                   options: dict[str, str] | None = None) -> list[Kernel]:
    """The kernels that run ``fmt`` on ``device``, best (highest priority) first — a
    :class:`QuantLinear` runs each call on the first that accepts its token count — or only
    the named kernel (checked; ``options`` are its options), which then runs every call."""
    from ..options import parse_options

    registry = get_plugin_manager().registry("kernel")
    if name is not None:
        cls = registry.get(name)
        kernel = cls(parse_options(cls.Options, options or {}, owner=f"kernel {cls.name!r}"))
        reason = kernel.serves(fmt, device)
        if reason:
            raise IncompatiblePlanError(f"kernel {cls.name!r} cannot run {fmt.spec} on {device}: {reason}")
        return [kernel]
    candidates = []
    for entry in registry.entries.values():
        kernel = entry.component()
        if kernel.serves(fmt, device) is None:
            candidates.append(kernel)
    if not candidates:
        raise IncompatiblePlanError(f"no installed kernel runs {fmt.spec} on {device}; "
                                    "install one or use --kernel torch-dequant")
    return sorted(candidates, key=lambda k: -k.priority)


def triton_interpreting() -> bool:
    """Whether Triton runs its interpreter (``TRITON_INTERPRET=1``: kernels on CPU tensors, for tests)."""
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_unavailable(device: torch.device, tokens: int | None = None, max_tokens: int | None = None) -> str | None:
    """``None`` if a Triton kernel can run on ``device`` here, else why not — for a Triton
    kernel's :meth:`~quantfoundry.Kernel.serves`: Triton installed, a CUDA device (or a CPU under
    Triton's interpreter), and, given both, no more than ``max_tokens`` rows in the call (larger
    ones go to the next kernel, a dequantized cuBLAS GEMM)."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install triton)"
    if device.type != "cuda" and not (device.type == "cpu" and triton_interpreting()):
        return "Triton kernels run on CUDA devices (on a CPU: TRITON_INTERPRET=1, for tests)"
    if tokens is not None and max_tokens is not None and tokens > max_tokens:
        return f"above {max_tokens} tokens a dequantized cuBLAS GEMM is faster"
    return None


def select_kernel(fmt: Format, device: torch.device, name: str | None = None,
                  options: dict[str, str] | None = None) -> Kernel:
    """The named kernel (checked), or the highest-priority kernel that serves ``fmt`` on ``device``."""
    return select_kernels(fmt, device, name, options)[0]


def swap_in(root: nn.Module, name: str, qw: QuantizedWeight, kernel: Kernel | Sequence[Kernel]) -> QuantLinear:
    """Replace the ``nn.Linear`` (or ``QuantLinear``: a refined weight) at ``name`` (relative to
    ``root``) by a :class:`QuantLinear` run by ``kernel`` (or by the first of ``kernel``'s kernels
    that accepts each call), keeping its bias."""
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, attr)
    bias = getattr(old, "bias", None) if isinstance(old, nn.Linear | QuantLinear) else None
    bias = bias.data if isinstance(bias, nn.Parameter) else bias
    ql = QuantLinear(qw, bias, kernel)
    setattr(parent, attr, ql)
    return ql

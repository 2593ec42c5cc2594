"""The FP8 KV cache, simulated: keys (after RoPE, as the cache holds them) and values quantized
per tensor with a static scale each (``k_scale``, ``v_scale``), as vLLM's fp8 KV cache stores
them, inside transformers' own attention.

Each attention module of the model carries a :class:`KVState` (attribute ``_qf_kv``); the
model's attention implementation is swapped for a wrapper registered with transformers'
``AttentionInterface`` (``qf-kv-sdpa``, ``qf-kv-eager``, …) that, before calling the original
implementation, either *observes* the keys and values (``max|k|``, ``max|v|``: calibration) or
quantizes and dequantizes them with the state's scales (simulation). Modules without a state,
or with neither, pass through. The mask is the original implementation's.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..roles.activation import ActQuant

PREFIX = "qf-kv-"


@dataclass
class KVState:
    """One attention module's KV-cache scheme: its scales (simulating) or running maxima (observing)."""

    act: ActQuant
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None
    observing: bool = False
    k_max: float = 0.0
    v_max: float = 0.0

    def finish_observing(self) -> None:
        """Turn the maxima seen into scales (float32 ``[1]``) and start simulating."""
        self.k_scale = self.act.scale_for(torch.tensor([self.k_max]))
        self.v_scale = self.act.scale_for(torch.tensor([self.v_max]))
        self.observing = False


def _original(module: nn.Module, impl: str) -> Any:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if impl == "eager":  # each modeling file has its own eager attention
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[impl]


def wrapped_implementation(impl: str) -> str:
    """The registered wrapper of attention implementation ``impl`` (registered on first use)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if impl.startswith(PREFIX):
        return impl
    name = PREFIX + impl

    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs: Any) -> Any:
        st = getattr(module, "_qf_kv", None)
        if st is not None and st.observing:
            st.k_max = max(st.k_max, float(key.detach().abs().amax()))
            st.v_max = max(st.v_max, float(value.detach().abs().amax()))
        elif st is not None and st.k_scale is not None:
            key = st.act.fake_quant(key, st.k_scale)
            value = st.act.fake_quant(value, st.v_scale)
        return _original(module, impl)(module, query, key, value, attention_mask, **kwargs)

    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, attention)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[impl])
    return name


def enable(model: nn.Module) -> None:
    """Route ``model``'s attention through the wrapper (its config, shared by every module)."""
    config = model.config
    config._attn_implementation = wrapped_implementation(config._attn_implementation or "sdpa")


def attach(attention: nn.Module, state: KVState) -> None:
    attention._qf_kv = state  # a plain attribute: no parameter, nothing in the state dict


def state_of(attention: nn.Module) -> KVState | None:
    return getattr(attention, "_qf_kv", None)

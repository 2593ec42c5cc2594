"""Streaming input statistics of a block's input groups: mean |x| per channel and the Gram
matrix ``XᵀX``, from one float forward over the calibration batches (activations are never
stored: memory is one ``[in, in]`` matrix per group)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from quantfoundry import Block


@dataclass
class InputStats:
    """Statistics of the input ``X`` ``[n, in]`` that one group of linears reads."""

    abs_sum: torch.Tensor  # Σ|x| per channel, float64
    gram: torch.Tensor     # XᵀX, float32
    count: int             # n (tokens)

    @property
    def abs_mean(self) -> torch.Tensor:
        return (self.abs_sum / max(self.count, 1)).float()


@torch.no_grad()
def collect_stats(block: Block, readers: dict[str, str], device: torch.device) -> dict[str, InputStats]:
    """Run ``block`` in float on its calibration inputs; for each ``key → linear`` of
    ``readers`` (one linear per input group) accumulate the statistics of that linear's input."""
    stats: dict[str, InputStats] = {}
    key_of = {lin: key for key, lin in readers.items()}

    def add(name: str, x: torch.Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1]).to(device=device, dtype=torch.float32)
        key = key_of[name]
        st = stats.get(key)
        if st is None:
            n_in = x2.shape[1]
            st = stats[key] = InputStats(torch.zeros(n_in, dtype=torch.float64, device=device),
                                         torch.zeros(n_in, n_in, dtype=torch.float32, device=device), 0)
        st.abs_sum += x2.abs().sum(0, dtype=torch.float64)
        st.gram.addmm_(x2.T, x2)
        st.count += x2.shape[0]

    with block.capture_inputs(list(readers.values()), add):
        block.run()
    return stats

"""Hadamard matrices and fast randomized Hadamard transforms (QuIP#'s incoherence processing):
:mod:`quantfoundry.hadamard`, which the weight transforms of ``roles`` use, in the toolkit."""

from __future__ import annotations

from ..hadamard import (
           MAX_BASE,
           RandomHadamard,
           base_matrix,
           factor,
           hadamard_matrix,
           hadamard_transform,
           random_signs,
)

__all__ = ["MAX_BASE", "RandomHadamard", "base_matrix", "factor", "hadamard_matrix", "hadamard_transform",
           "random_signs"]

"""The core's Hadamard toolkit (``quantfoundry.toolkit.hadamard``) against float64 matrices."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from quantfoundry.toolkit import hadamard as H


@pytest.mark.parametrize("m", [2, 12, 20, 24, 28, 36, 44, 60, 68, 72, 76, 108])
def test_base_matrices_are_hadamard(m: int) -> None:
    """±1 entries and H Hᵀ = m I, checked in integer arithmetic (numpy int64)."""
    h = H.base_matrix(m).numpy().astype(np.int64)
    assert set(np.unique(h)) == {-1, 1}
    assert (h @ h.T == m * np.eye(m, dtype=np.int64)).all()


def test_factorisations_of_model_widths() -> None:
    assert H.factor(4096) == (1, 4096)
    assert H.factor(576) == (36, 16)      # SmolLM2's hidden size
    assert H.factor(1536) == (12, 128)    # its intermediate size
    assert H.factor(14336) == (28, 512)   # Llama-3-8B's intermediate size
    with pytest.raises(ValueError, match="11008"):
        H.factor(11008)                   # 43 · 2^8: needs a Hadamard matrix of order 172


@pytest.mark.parametrize("n", [64, 256, 576, 768, 1536, 5120])
def test_transform_is_the_dense_product(n: int) -> None:
    """``hadamard_transform`` (butterflies and the dense factor) equals ``x Hᵀ / √n`` and
    ``x H / √n`` with the whole matrix in float64, H itself checked to be Hadamard."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(7, n, generator=g, dtype=torch.float64)
    h = H.hadamard_matrix(n)
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))
    assert torch.allclose(H.hadamard_transform(x), x @ h.T / math.sqrt(n), atol=1e-12, rtol=0)
    assert torch.allclose(H.hadamard_transform(x, transpose=True), x @ h / math.sqrt(n), atol=1e-12, rtol=0)


def test_random_hadamard_is_orthogonal_and_inverts() -> None:
    n = 1536
    q = H.RandomHadamard(H.random_signs(n, seed=3))
    m = q.matrix()
    assert torch.allclose(m @ m.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, n, generator=g, dtype=torch.float64)
    assert torch.allclose(q.apply(x), x @ m.T, atol=1e-12, rtol=0)
    assert torch.allclose(q.apply_t(q.apply(x)), x, atol=1e-12, rtol=0)
    # 16-bit inputs: float32 arithmetic, the result in the input's dtype
    xb = x.to(torch.bfloat16)
    yb = q.apply(xb)
    assert yb.dtype == torch.bfloat16
    assert torch.allclose(yb.double(), xb.double() @ m.T, atol=0.02, rtol=0.02)
    # the same signs from the same seed, on any device
    assert torch.equal(H.random_signs(n, seed=3), q.signs)


def test_incoherence() -> None:
    """A weight with one huge entry per row spreads out: max |Q w| / ‖w‖ ≈ √(2 ln n / n)."""
    n = 4096
    w = torch.zeros(8, n, dtype=torch.float64)
    w[:, 5] = 100.0
    y = H.RandomHadamard(H.random_signs(n, seed=1)).apply(w)
    assert float(y.abs().max() / w.norm(dim=1).max()) <= 2 * math.sqrt(2 * math.log(n) / n)

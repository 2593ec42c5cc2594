"""Hadamard matrices and fast (randomized) Hadamard transforms, for incoherence processing
(QuIP#'s randomized Hadamard transform; rotations before quantization in general).

A Hadamard matrix ``H`` of order ``n`` has entries ±1 and ``H Hᵀ = n I``. Orders here are
``n = m · 2^k`` with ``H = H_m ⊗ H_{2^k}``: ``H_{2^k}`` is Sylvester's (``[[H, H], [H, −H]]``,
itself ``H_a ⊗ H_b`` for ``ab = 2^k``) and ``H_m`` (``m`` ≤
:data:`MAX_BASE`) is 1, 2 or a Paley matrix over a prime field — type I for a prime ``q ≡ 3 (mod
4)``, order ``q + 1`` (12, 20, 24, 44, 48, 60, 68, 72, …); type II for a prime ``q ≡ 1 (mod 4)``,
order ``2(q + 1)`` (28, 36, 60, 76, …) — applied densely along its axis. The factorisation takes the smallest such ``m``: SmolLM2's 576 = 36 · 16, 1536
= 12 · 128, Llama-3's 14336 = 28 · 512. A width with no such factorisation raises
``ValueError`` (a prime-power Paley construction or a stored matrix would serve more).

:func:`hadamard_transform` multiplies the last dimension of ``x`` by ``Hᵀ / √n`` (or ``H / √n``),
an orthogonal map, as one small batched matmul per Kronecker factor (``O(n · Σ orders)``
operations per row, 2–3 launches on a GPU); :class:`RandomHadamard` adds a sign
vector ``s``: ``Q = H · diag(s) / √n``, a random orthogonal matrix whose products with any
fixed vector have Gaussian-like, incoherent entries (QuIP#, §3).
"""

from __future__ import annotations

import functools
import math

import torch

#: the largest dense factor ``H_m`` used
MAX_BASE = 256


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q[i, j] = χ(j − i)`` over GF(q), ``χ`` the quadratic character (0 at 0)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if d in squares else -1 for d in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


@functools.cache
def _paley(m: int) -> torch.Tensor | None:
    """A Paley Hadamard matrix of order ``m`` over a prime field, or None."""
    if _is_prime(m - 1) and (m - 1) % 4 == 3:  # type I: q = m − 1
        q = m - 1
        jq = _jacobsthal(q)
        s = torch.zeros(m, m, dtype=torch.float64)
        s[0, 1:] = 1
        s[1:, 0] = -1
        s[1:, 1:] = jq
        return s + torch.eye(m, dtype=torch.float64)
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:  # type II: q = m / 2 − 1
        q = m // 2 - 1
        c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        c[0, 1:] = 1
        c[1:, 0] = 1
        c[1:, 1:] = _jacobsthal(q)
        plus = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        minus = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, plus) + torch.kron(torch.eye(q + 1, dtype=torch.float64), minus)
    return None


@functools.cache
def base_matrix(m: int) -> torch.Tensor:
    """``H_m`` (float64, ±1) for ``m`` in 1, 2 and the Paley orders; ValueError otherwise."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if m == 2:
        return torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    h = _paley(m)
    if h is None:
        raise ValueError(f"no Hadamard matrix of order {m} is built here")
    if not torch.equal(h @ h.T, m * torch.eye(m, dtype=torch.float64)):  # integers: exact in float64
        raise AssertionError(f"the Paley construction of order {m} is not a Hadamard matrix")
    return h


def factor(n: int) -> tuple[int, int]:
    """``(m, 2^k)`` with ``n = m · 2^k``, ``H_m`` buildable and ``m`` smallest; ValueError if none."""
    if n < 1:
        raise ValueError(f"a Hadamard transform needs a positive width, got {n}")
    p = n & -n
    while p >= 1:
        m = n // p
        if m <= MAX_BASE:
            try:
                base_matrix(m)
                return m, p
            except ValueError:
                pass
        p //= 2
    raise ValueError(f"width {n} is not m · 2^k with a Hadamard matrix of order m ≤ {MAX_BASE} built here "
                     "(1, 2, or a Paley order over a prime field)")


#: the largest Sylvester factor applied as one dense matrix (``H_{2^k}`` is split into factors up to this)
_SYLVESTER_STEP = 64


@functools.cache
def _sylvester(p: int) -> torch.Tensor:
    """Sylvester's ``H_p`` (float64, ±1, symmetric) for a power of two ``p``."""
    syl = torch.ones(1, 1, dtype=torch.float64)
    while syl.shape[0] < p:
        syl = torch.cat([torch.cat([syl, syl], 1), torch.cat([syl, -syl], 1)], 0)
    return syl


@functools.cache
def _factors(n: int) -> tuple[tuple[int, bool], ...]:
    """The Kronecker factors of ``H_n`` in axis order: ``(order, is_base)`` — ``H_m`` first, then
    Sylvester factors of at most :data:`_SYLVESTER_STEP` (``H_{ab} = H_a ⊗ H_b`` for Sylvester's)."""
    m, p = factor(n)
    out = [(m, True)] if m > 1 else []
    while p > 1:
        step = min(p, _SYLVESTER_STEP)
        out.append((step, False))
        p //= step
    return tuple(out)


@functools.cache
def _factor_matrix(order: int, is_base: bool, transpose: bool, device: str, dtype: torch.dtype) -> torch.Tensor:
    h = base_matrix(order) if is_base else _sylvester(order)
    return (h.T if transpose else h).to(device=device, dtype=dtype).contiguous()


def hadamard_matrix(n: int) -> torch.Tensor:
    """``H_m ⊗ H_{2^k}`` of order ``n`` (float64, ±1): the matrix :func:`hadamard_transform` applies."""
    m, p = factor(n)
    return torch.kron(base_matrix(m), _sylvester(p))


def hadamard_transform(x: torch.Tensor, *, transpose: bool = False) -> torch.Tensor:
    """``x · Hᵀ / √n`` over the last dimension (``transpose``: ``x · H / √n``), in ``x``'s dtype
    (float32 arithmetic for 16-bit inputs).

    ``H`` is a Kronecker product of small factors (``H_m`` and Sylvester blocks of up to 64), so
    with the row viewed as a tensor of those orders, ``H x`` multiplies each axis by its factor:
    one batched matmul per factor (2–3 for LLM widths), ``O(n Σ orders)`` operations per row.
    """
    n = x.shape[-1]
    lead = x.shape[:-1]
    work = x.to(torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else x
    rows = work.reshape(-1, n)
    before = rows.shape[0]
    after = n
    for order, is_base in _factors(n):
        after //= order
        h = _factor_matrix(order, is_base, transpose and is_base, str(x.device), work.dtype)
        # axis of this factor: [before, order, after]; (H ⊗ ·) acts on it as H @ X
        rows = torch.matmul(h, rows.reshape(before, order, after))
        before *= order
    return (rows.reshape(*lead, n) * (1.0 / math.sqrt(n))).to(x.dtype)


def random_signs(n: int, seed: int) -> torch.Tensor:
    """``n`` signs ±1 (float32) from ``seed`` (a CPU generator: the same on every device)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g, dtype=torch.int64).mul(2).sub(1).to(torch.float32)


class RandomHadamard:
    """``Q = H · diag(s) / √n`` for a sign vector ``s``: :meth:`apply` is ``x ↦ x Qᵀ`` over the
    last dimension, :meth:`apply_t` ``x ↦ x Q`` (its inverse, ``Q`` being orthogonal)."""

    def __init__(self, signs: torch.Tensor) -> None:
        self.signs = signs.to(torch.float32)
        self.n = signs.numel()
        factor(self.n)  # fails here, not at the first call

    def _work(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` in the dtype the arithmetic runs in (float32 for 16-bit inputs) and the signs in it."""
        dt = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        return x.to(dt), self.signs.to(x.device, dt)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        work, s = self._work(x)
        return hadamard_transform(work * s).to(x.dtype)

    def apply_t(self, x: torch.Tensor) -> torch.Tensor:
        work, s = self._work(x)
        return (hadamard_transform(work, transpose=True) * s).to(x.dtype)

    def matrix(self) -> torch.Tensor:
        """``Q`` (float64)."""
        return hadamard_matrix(self.n) * self.signs.double() / math.sqrt(self.n)

"""HQQ's zero-point rounds as fused Triton kernels: one kernel per round over all groups, and
one that sums the round's error in a fixed order (deterministic).

A round of :func:`qf_hqq.quantizer.optimize_zero` in torch is a dozen element-wise kernels,
each reading and writing the whole weight; here it is one pass: every program loads a tile of
groups of ``W / s``, rounds, shrinks, moves the zero points in place and writes its part of
the round's error. The early stop stays on the device: round ``r`` reads the errors of rounds
``0 … r−1`` (at most :data:`MAX_ITERS`, as one vector) and, once one of them did not improve
on the best before it, leaves the zero points where they are — the CPU loop's semantics (the round that
does not improve keeps its update, later ones do nothing). No host sync, so the rounds are
captured once per weight shape in a CUDA graph (:mod:`qf_hqq.cuda_loop` keeps them).

``triton`` comes with PyTorch's CUDA wheels; :func:`available` says whether it can be used.
With ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors (the tests do).
"""

from __future__ import annotations

from typing import Any

import torch

MAX_ITERS = 64  # errors kept per loop (the paper's 20 rounds)
TILE = 4096  # values per program


def available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:  # pragma: no cover - CPU wheels without triton
        return False
    return True


_kernels: dict[str, Any] = {}


def _build() -> dict[str, Any]:
    """Compile-on-first-use (``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates)."""
    if _kernels:
        return _kernels
    import triton
    import triton.language as tl

    @triton.jit
    def hqq_round(v_ptr, z_ptr, s_ptr, part_ptr, err_ptr, n_groups, g, qmin, qmax, expo, inv_beta, r,
                  EARLY_STOP: tl.constexpr, BG: tl.constexpr, G: tl.constexpr, MAX_ITERS: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BG + tl.arange(0, BG)
        cols = tl.arange(0, G)
        rmask = rows < n_groups
        mask = rmask[:, None] & (cols[None, :] < g)
        stopped = False
        if EARLY_STOP:
            # a round j < r did not improve on the best before it; until the first such round
            # the errors fall strictly, so that is the first j with err[j] >= err[j - 1]
            j = tl.arange(0, MAX_ITERS)
            seen = (j >= 1) & (j < r)
            cur = tl.load(err_ptr + j, mask=seen, other=0.0)
            prev = tl.load(err_ptr + j - 1, mask=seen, other=1.0)
            stopped = tl.max(tl.where(seen & (cur >= prev), 1, 0), axis=0) > 0
        z = tl.load(z_ptr + rows, mask=rmask, other=0.0)
        s = tl.load(s_ptr + rows, mask=rmask, other=1.0)
        v = tl.load(v_ptr + rows[:, None] * g + cols[None, :], mask=mask, other=0.0)
        u = v + z[:, None]
        # round half to even (torch.round): 1.5 * 2**23 pushes the fraction out of a float32
        q = (u + 12582912.0) - 12582912.0
        q = tl.minimum(tl.maximum(q, qmin), qmax)
        d = u - q
        a = tl.where(mask, tl.abs(d), 0.0)
        gerr = tl.sum(a, axis=1) / g * s
        tl.store(part_ptr + pid, tl.sum(tl.where(rmask, gerr, 0.0), axis=0))
        # t = (s|d| + 1e-8)^(p-1) / (beta s): the soft threshold of the lp shrink, in code units
        t = tl.exp2(tl.log2(a * s[:, None] + 1e-8) * expo) * (inv_beta / s)[:, None]
        m = tl.minimum(a, t)
        step = tl.sum(tl.where(d < 0, -m, m), axis=1) / g
        if EARLY_STOP:
            step = tl.where(stopped, 0.0, step)
        tl.store(z_ptr + rows, z - step, mask=rmask)

    @triton.jit
    def hqq_error(part_ptr, err_ptr, n_parts, n_groups, r, B: tl.constexpr):
        acc = tl.zeros((B,), dtype=tl.float32)
        for start in range(0, n_parts, B):
            idx = start + tl.arange(0, B)
            acc += tl.load(part_ptr + idx, mask=idx < n_parts, other=0.0)
        tl.store(err_ptr + r, tl.sum(acc, axis=0) / n_groups)

    _kernels.update(round=hqq_round, error=hqq_error)
    return _kernels


class Loop:
    """The buffers of one loop over ``n_groups`` groups of ``g`` (a graph replays on the same
    memory): ``v = W / s``, the scales, the zero points (updated in place), the errors."""

    def __init__(self, n_groups: int, g: int, device: torch.device):
        self.n_groups, self.g = n_groups, g
        self.G = 1 << (g - 1).bit_length()
        self.BG = max(1, TILE // self.G)
        self.n_parts = -(-n_groups // self.BG)
        self.v = torch.empty(n_groups, g, device=device)
        self.s = torch.empty(n_groups, device=device)
        self.z = torch.empty(n_groups, device=device)
        self.parts = torch.empty(self.n_parts, device=device)
        self.err = torch.empty(MAX_ITERS, device=device)

    def load(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        torch.div(w.reshape(self.n_groups, self.g), scale.reshape(-1, 1), out=self.v)
        self.s.copy_(scale.reshape(-1))
        self.z.copy_(zero.reshape(-1))

    def run(self, qmin: int, qmax: int, o: Any) -> None:
        """``o.iters`` rounds (``o``: :class:`~qf_hqq.quantizer.HQQOptions`), no host sync."""
        if o.iters > MAX_ITERS:
            raise ValueError(f"the Triton HQQ loop keeps at most {MAX_ITERS} rounds, got iters={o.iters}")
        k = _build()
        beta = o.beta
        for r in range(o.iters):
            k["round"][(self.n_parts,)](self.v, self.z, self.s, self.parts, self.err, self.n_groups, self.g,
                                        float(qmin), float(qmax), o.lp_norm - 1.0, 1.0 / beta, r,
                                        EARLY_STOP=o.early_stop, BG=self.BG, G=self.G, MAX_ITERS=MAX_ITERS)
            k["error"][(1,)](self.parts, self.err, self.n_parts, self.n_groups, r, B=1024)
            beta *= o.kappa


def rounds(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int, o: Any) -> torch.Tensor:
    """HQQ's zero points for groups ``w`` ``[..., g]`` (``scale``/``zero`` ``[..., 1]``) by the
    Triton kernels, uncaptured: those of :func:`qf_hqq.quantizer.optimize_zero`."""
    g = w.shape[-1]
    loop = Loop(w.numel() // g, g, w.device)
    loop.load(w, scale, zero)
    loop.run(qmin, qmax, o)
    return loop.z.view(zero.shape).clone()

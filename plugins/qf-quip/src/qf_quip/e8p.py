"""QuIP#'s E8P12 codebook: 2^16 points of the shifted lattice ``E8 + 1/4`` for 8 weights at a
time (2 bits per weight), its exact nearest-point search and its decode table.

Construction (Tseng et al. 2024, "QuIP#", §4.2 and its reference code's ``E8P12``): the
*absolute patterns* are the 227 vectors of ``|D̂8|`` — coordinates in ``{1/2, 3/2, 5/2, 7/2}``
with squared norm at most 10 (every such pattern has a signing in ``D8 + 1/2`` with an even
coordinate sum) — in lexicographic order, then 29 chosen patterns of norm 12 (five 3/2 and three
1/2), 256 in all. Pattern ``a`` is stored as ``b``: ``a`` with its last coordinate negated when
``Σ a`` is odd, so that ``Σ b`` is even. A 16-bit code ``c`` holds the pattern index in its high
byte and eight sign bits in its low byte; the sign bits' parity ``p`` picks the shift and the
last of them is corrected to make the flips even:

    signs = (c & 255) ^ p,   point = (b[c >> 8] with coordinate i negated where signs bit 7 − π(i) is set)
                                     + (−1/4 if p else +1/4)

with ``π = (0, 2, 1, 3, 4, 6, 5, 7)`` (the reference code's coordinate order; an involution), so
a code here decodes to the same point as in QuIP#'s checkpoints. An even number of flips keeps
``Σ b`` even, so ``point ∓ 1/4`` lies in ``D8 + 1/2`` (``p = 0``) or ``D8`` (``p = 1``): every
point is in ``E8 + 1/4``, and the 65,536 points are distinct.

**Nearest point, exactly, without scanning 65,536 points**: for either shift ``t`` let ``y = x −
t``; for a pattern ``b`` the best even signing maximises ``Σ σᵢ bᵢ yᵢ``: ``σᵢ = sign(bᵢ yᵢ)``
gives ``Σ |bᵢ yᵢ|``, and where that signing has an odd number of flips the best even one flips
back the coordinate with the smallest ``|bᵢ yᵢ|``. So each of the 2 × 256 (shift, pattern)
pairs costs 8 products, and the squared distance is ``‖y‖² + ‖b‖² − 2 · score``. Ties between
points go to the smaller (shift, pattern) pair — ``+1/4`` first, then the pattern index. The
search ranks the 512 pairs first by the bound ``‖y‖² + ‖b‖² − 2 Σ |bᵢ yᵢ|`` (parity ignored: one
matmul), takes the exact distance of the 4 best, and searches in full only the rows where the
best of those is not strictly below the fifth bound — the same answer as the full search.
"""

from __future__ import annotations

import functools

import torch

#: the coordinate order of the reference code's packed patterns and sign bits (an involution)
SHUFFLE = (0, 2, 1, 3, 4, 6, 5, 7)
#: QuIP#'s scale of the codebook against unit-variance weights (``E8P12_codebook.opt_scale``)
OPT_SCALE = 1.03
#: the 29 patterns of squared norm 12 (times 2), in the reference code's order
NORM12 = (
    (3, 1, 1, 1, 3, 3, 3, 3), (1, 3, 1, 1, 3, 3, 3, 3), (1, 1, 3, 1, 3, 3, 3, 3), (1, 1, 1, 3, 3, 3, 3, 3),
    (3, 3, 3, 1, 3, 3, 1, 1), (3, 3, 3, 1, 3, 1, 3, 1), (3, 3, 3, 1, 1, 3, 3, 1), (3, 3, 3, 1, 3, 1, 1, 3),
    (3, 3, 3, 1, 1, 3, 1, 3), (3, 3, 3, 1, 1, 1, 3, 3), (3, 3, 1, 3, 3, 3, 1, 1), (3, 3, 1, 3, 3, 1, 3, 1),
    (3, 3, 1, 3, 1, 3, 3, 1), (3, 3, 1, 3, 3, 1, 1, 3), (3, 3, 1, 3, 1, 3, 1, 3), (3, 3, 1, 3, 1, 1, 3, 3),
    (3, 1, 3, 3, 3, 3, 1, 1), (3, 1, 3, 3, 3, 1, 3, 1), (3, 1, 3, 3, 1, 3, 3, 1), (3, 1, 3, 3, 3, 1, 1, 3),
    (3, 1, 3, 3, 1, 3, 1, 3), (1, 3, 3, 3, 1, 1, 3, 3), (1, 3, 3, 3, 3, 3, 1, 1), (1, 3, 3, 3, 3, 1, 3, 1),
    (1, 3, 3, 3, 1, 3, 3, 1), (1, 3, 3, 3, 3, 1, 1, 3), (1, 3, 3, 3, 1, 3, 1, 3), (1, 1, 3, 3, 1, 3, 3, 3),
    (3, 3, 1, 1, 3, 3, 3, 1),
)
_CHUNK = 4096  # vectors per step of the nearest search (bounds its temporaries)
_SHORTLIST = 4  # (shift, pattern) pairs whose exact distance the search checks first


@functools.cache
def abs_patterns() -> torch.Tensor:
    """The 256 absolute patterns ``[256, 8]`` (float32): ``|D̂8|`` in lexicographic order, then
    the 29 of norm 12."""
    half = torch.tensor([0.5, 1.5, 2.5, 3.5])
    grid = torch.cartesian_prod(*[half] * 8)  # 4^8 rows, already in lexicographic order
    d8 = grid[(grid * grid).sum(-1) <= 10]
    return torch.cat([d8, torch.tensor(NORM12, dtype=torch.float32) / 2])


@functools.cache
def signed_patterns() -> torch.Tensor:
    """``b``: each pattern with its last coordinate negated where its sum is odd ``[256, 8]``."""
    a = abs_patterns().clone()
    a[:, 7] *= 1 - 2 * (a.sum(1) % 2)
    return a


@functools.cache
def _table_cpu() -> torch.Tensor:
    c = torch.arange(1 << 16)
    sign_bits = c & 255
    parity = torch.zeros_like(c)
    for i in range(8):
        parity ^= (sign_bits >> i) & 1
    signs = sign_bits ^ parity
    bit = torch.tensor([7 - SHUFFLE[i] for i in range(8)])
    flip = ((signs[:, None] >> bit) & 1).bool()
    points = signed_patterns()[c >> 8].clone()
    points[flip] *= -1
    return points + torch.where(parity.bool(), -0.25, 0.25)[:, None]


def table(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 65,536 points ``[65536, 8]`` (float32) in code order (read-only, made once per device)."""
    return _table_on(str(torch.device(device)))


@functools.cache
def _table_on(device: str) -> torch.Tensor:
    return _table_cpu().to(device)


@functools.cache
def _search_consts(device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    b = signed_patterns()
    bit = torch.tensor([7 - SHUFFLE[i] for i in range(8)])
    return (b.abs().to(device), (b * b).sum(1).to(device), (b < 0).sum(1).remainder(2).to(device),
            (1 << bit).to(device))


def nearest(x: torch.Tensor) -> torch.Tensor:
    """Codes (int32 ``[n]``) of the points nearest the rows of ``x`` ``[n, 8]`` (float32)."""
    if x.ndim != 2 or x.shape[1] != 8:
        raise ValueError(f"E8P rounds vectors of 8, got shape {tuple(x.shape)}")
    out = torch.empty(x.shape[0], dtype=torch.int32, device=x.device)
    for a in range(0, x.shape[0], _CHUNK):
        out[a:a + _CHUNK] = _nearest_chunk(x[a:a + _CHUNK].float())
    return out


def _nearest_chunk(x: torch.Tensor) -> torch.Tensor:
    """Exact nearest codes of ``x`` ``[n, 8]``: the (shift, pattern) pairs ranked by a lower bound
    of their distance (the signing's parity ignored: one matmul), the exact distance of the
    :data:`_SHORTLIST` best checked, and rows whose best exact distance is not below the next
    pair's bound searched in full (:func:`_nearest_full`), so the answer is the full search's."""
    babs, bnorm, bodd, _ = _search_consts(str(x.device))
    shift = torch.tensor([0.25, -0.25], device=x.device)
    y = x[:, None, :] - shift[None, :, None]                       # [n, 2, 8]
    ya = y.abs()
    yy = (y * y).sum(-1, keepdim=True)                             # [n, 2, 1]
    bound = (yy + bnorm - 2 * ya @ babs.T).reshape(x.shape[0], -1)  # [n, 512], ≤ the exact distance
    k = _SHORTLIST
    low, idx = torch.topk(bound, k + 1, dim=1, largest=False, sorted=True)
    cand = idx[:, :k]
    t, j = cand // 256, cand % 256
    rows = torch.arange(x.shape[0], device=x.device)[:, None]
    yt = y[rows, t]                                                # [n, k, 8]
    prod = yt.abs() * babs[j]
    odd = ((yt < 0).sum(-1).remainder(2) != bodd[j]).to(prod.dtype)
    exact = low[:, :k] + 4 * odd * prod.amin(-1)                   # the bound plus the parity fix
    # among the shortlist, the smallest exact distance, ties to the smaller flat index
    best_d = exact.min(1, keepdim=True).values
    flat = torch.where(exact == best_d, cand, torch.full_like(cand, 1 << 20)).min(1).values
    out = _code(y, flat)
    hard = ~(best_d[:, 0] < low[:, k])  # another pair may be as near: search those rows in full
    if bool(hard.any()):
        out[hard] = _nearest_full(x[hard])
    return out


def _code(y: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """The code of (shift, pattern) ``best`` (flat index) for the shifted inputs ``y`` ``[n, 2, 8]``:
    ``σ_i = sign(b_i y_i)``, the smallest ``|b_i y_i|`` flipped back where that is odd."""
    _, _, bodd, weight = _search_consts(str(y.device))
    n = y.shape[0]
    t, j = best // 256, best % 256
    yt = y[torch.arange(n, device=y.device), t]                    # [n, 8]
    bj = signed_patterns().to(y.device)[j]
    neg = (yt < 0) != (bj < 0)
    fix = (yt < 0).sum(-1).remainder(2) != bodd[j]
    first_min = torch.nn.functional.one_hot((yt.abs() * bj.abs()).argmin(-1), 8).bool()
    neg = neg ^ (first_min & fix[:, None])
    signs = (neg.to(torch.int64) * weight).sum(-1)                 # even popcount
    return ((j << 8) | (signs ^ t)).to(torch.int32)                # a set bit 0 carries the −1/4 shift


def _nearest_full(x: torch.Tensor) -> torch.Tensor:
    """The exact distance of every (shift, pattern) pair (``[n, 2, 256, 8]`` products)."""
    babs, bnorm, bodd, _ = _search_consts(str(x.device))
    shift = torch.tensor([0.25, -0.25], device=x.device)
    y = x[:, None, :] - shift[None, :, None]                       # [n, 2, 8]: the two shifts
    prod = y.abs()[:, :, None, :] * babs[None, None]               # [n, 2, 256, 8] = |b_i y_i|
    odd = ((y < 0).sum(-1, keepdim=True).remainder(2) != bodd[None, None]).to(prod.dtype)  # [n, 2, 256]
    score = prod.sum(-1) - 2 * odd * prod.amin(-1)
    dist = (y * y).sum(-1, keepdim=True) + bnorm[None, None] - 2 * score
    return _code(y, dist.reshape(x.shape[0], -1).argmin(-1))      # ties: the first (shift, pattern)


def decode(codes: torch.Tensor) -> torch.Tensor:
    """The points ``[..., 8]`` (float32) of ``codes`` (any integer dtype, values 0–65535)."""
    return table(codes.device)[codes.long() & 0xFFFF]


@functools.cache
def _e81b_cpu() -> torch.Tensor:
    """QuIP#'s 1-bit E8 codebook (``E8P12RVQ3B``'s second stage), 256 points ``[256, 8]``: the E8
    points of squared norm ≤ 2 — the origin and the 112 integer roots ``±e_i ± e_j`` in
    lexicographic order, then the 128 half-integer roots ``(±1/2)^8`` with an even sum, in
    lexicographic order — and 15 of the 16 points ``±2 e_i`` (all but ``−2 e_7``)."""
    ints = torch.cartesian_prod(*[torch.arange(-1, 2)] * 8).float()  # |coordinate| ≤ 1 suffices
    ints = ints[(ints.sum(-1) % 2 == 0) & ((ints * ints).sum(-1) <= 2)]
    halves = torch.cartesian_prod(*[torch.tensor([-0.5, 0.5])] * 8)
    halves = halves[halves.sum(-1) % 2 == 0]
    norm4 = torch.cat([2 * torch.eye(8), -2 * torch.eye(8)[:7]])
    return torch.cat([ints, halves, norm4])


def e81b_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """:func:`_e81b_cpu` on ``device`` (made once per device, read-only)."""
    return _e81b_on(str(torch.device(device)))


@functools.cache
def _e81b_on(device: str) -> torch.Tensor:
    return _e81b_cpu().to(device)


def nearest_e81b(x: torch.Tensor) -> torch.Tensor:
    """Codes (int32 ``[n]``) of the 1-bit E8 points nearest the rows of ``x`` ``[n, 8]`` (all 256
    compared; ties to the smaller code)."""
    t = e81b_table(x.device)
    out = torch.empty(x.shape[0], dtype=torch.int32, device=x.device)
    norms = (t * t).sum(-1)
    for a in range(0, x.shape[0], 4 * _CHUNK):
        xs = x[a:a + 4 * _CHUNK].float()
        out[a:a + 4 * _CHUNK] = (norms[None] - 2 * xs @ t.T).argmin(-1).to(torch.int32)
    return out

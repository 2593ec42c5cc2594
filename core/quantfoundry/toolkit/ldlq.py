"""The LDLQ column loop — GPTQ's (Frantar et al. 2022, Algorithm 1), which QuIP (Chee et al.
2023) showed to be LDLQ — over the core Format interface, for scalar and vector grids.

One call quantizes the rows of every linear that shares one Hessian ``H = 2 X Xᵀ / n`` (q/k/v,
gate/up): the rows are stacked and rounded together, each row segment onto its own format, so
the Cholesky factorisation and the column loop run once per shared input.

For each column ``j`` (in act-order when asked): round ``w_j`` onto the grid of its group →
``q_j``; ``e = (w_j − q_j) / U_jj``; every later column ``k`` gets ``w_k −= e · U_jk``, where ``U``
is the upper Cholesky factor of ``H⁻¹`` (the paper's equations (3)–(4) with the Cholesky
reformulation of section 3.3). Updates are *lazy*: inside a block of ``block_size`` columns they
go to the block only, and the block's accumulated error reaches the columns after it in one
matmul. A group's grid parameters are fitted when the loop reaches the group's first column,
on the weights as they are then (all earlier errors applied) — or all before the loop with
``static_groups``. The block size is adjusted so that no group straddles a block boundary
unless it starts one, which keeps the fitted weights exactly up to date: the lazy loop gives
the result of the plain column-by-column loop, up to float rounding.

**Vector grids** (``Format.block_width`` = ``k`` > 1: E8P rounds 8 columns to one code) are
rounded ``k`` columns at a time (QuIP#'s BlockLDLQ): the block ``B`` of columns is rounded
jointly, its error ``E`` ``[rows, k]`` becomes ``E U_BB⁻¹`` and every later column ``F`` gets
``W_F −= E U_BB⁻¹ U_BF`` — the exact update of the remaining weights for a jointly rounded
block, which for ``k = 1`` is the scalar rule above.

GPTQ (``qf-gptq``) and QuIP# call :func:`ldlq_solve`; :func:`inverse_cholesky` and
:func:`prepare_hessian` serve any method that needs a damped ``H⁻¹`` factor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..options import Options
from ..roles.format import Format, Params


@dataclass(frozen=True, kw_only=True)
class LDLQOptions(Options):
    """The options of :func:`ldlq_solve` a quantizer built on it exposes (GPTQ's, QuIP#'s):
    subclass it and add your own fields."""

    damp_percent: float = field(default=0.01, metadata={
        "help": "dampening added to H's diagonal, as a fraction of its mean"})
    damp_max: float = field(default=1.0, metadata={
        "help": "when the Cholesky factorisation fails, double the dampening up to this fraction"})
    block_size: int = field(default=128, metadata={
        "help": "columns per lazy batch update (adjusted so that groups and vectors do not straddle batches)"})

    def __post_init__(self) -> None:
        if not 0 < self.damp_percent <= self.damp_max:
            raise ValueError(f"need 0 < damp_percent <= damp_max, got {self.damp_percent} and {self.damp_max}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")


class HessianError(RuntimeError):
    """The Cholesky factorisation failed at every damping tried."""


@dataclass
class Segment:
    """Rows ``[start, stop)`` of the stacked weight, rounded onto ``fmt``. ``tensors``: the row
    counts of the weights stacked in it, when there are several (each gets its own per-tensor
    parameters, :meth:`Format.fit_tensor`); default one weight."""

    start: int
    stop: int
    fmt: Format
    tensors: list[int] | None = None

    @property
    def rows(self) -> slice:
        return slice(self.start, self.stop)

    def row_counts(self) -> list[int]:
        return list(self.tensors) if self.tensors else [self.stop - self.start]


@dataclass
class LDLQResult:
    """Per segment: codes ``[rows, cols / block_width]`` and grid parameters ``[rows, groups, ...]`` in the
    stored column order; ``perm`` (stored column ``i`` = original column ``perm[i]``) when the
    codes are stored in act-order; the damping that made ``H`` factorisable; per segment, the
    per-tensor parameters of each weight stacked in it (empty dicts for most formats)."""

    codes: list[torch.Tensor]
    params: list[Params]
    perm: torch.Tensor | None
    damp: float
    damp_tries: int
    dead_columns: int
    values: torch.Tensor = field(repr=False)  # dequantized weights, original column order
    tensor_params: list[list[Params]] = field(default_factory=list)


def prepare_hessian(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy of ``h`` with every dead input channel (``H_jj = 0``: never active in calibration)
    given ``H_jj = 1``; its row and column are zero, so that channel is rounded to nearest and
    neither gives nor takes error. Returns ``(H, dead mask)``."""
    h = h.clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    return h, dead


def inverse_cholesky(h: torch.Tensor, damp_percent: float, damp_max: float) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` with ``λ = damp · mean(diag H)``, trying
    ``damp_percent``, then doubling it up to ``damp_max`` while a factorisation fails.
    Returns ``(U, damp used, tries)``."""
    mean_diag = torch.diagonal(h).mean()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    damp, tries = damp_percent, 0
    while True:
        tries += 1
        hd = h + (damp * mean_diag) * eye
        lower, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0 and bool(torch.isfinite(upper).all()):
                return upper.contiguous(), damp, tries
        if damp >= damp_max:
            raise HessianError(f"Cholesky factorisation failed up to damp_percent={damp:g}")
        damp = min(damp * 2, damp_max)


def lazy_block_size(block_size: int, groups: list[int], block_width: int = 1) -> int:
    """The block size nearest ``block_size`` such that every group either fits inside blocks
    (the block size is a multiple of it) or starts on a block boundary (it is a multiple of the
    block size), and that holds whole vectors of ``block_width`` columns."""
    def ok(b: int) -> bool:
        return b % block_width == 0 and all(b % g == 0 or g % b == 0 for g in groups)

    if ok(block_size):
        return block_size
    for b in sorted({g * max(1, round(block_size / g)) for g in groups} | set(groups)):
        if ok(b):
            return b
    return math.lcm(block_width, *groups)


def _keep_group_params(params: Params, n_groups: int) -> Params:
    """The fitted parameters indexed by group along dim 1 (transient per-column extras that a
    format's own encoder uses, such as chosen codes, are dropped: GPTQ chooses the codes)."""
    kept = {}
    for k, v in params.items():
        if v.dim() >= 2 and v.shape[1] == n_groups:
            kept[k] = v
        elif not k.startswith("_"):
            raise ValueError(f"format parameter {k!r} of shape {tuple(v.shape)} is not indexed by group")
    return kept


def _slice_group(params: Params, g: int) -> Params:
    return {k: v[:, g:g + 1] for k, v in params.items()}


def _fit_tensors(w: torch.Tensor, seg: Segment) -> tuple[list[Params], Params]:
    """Per-tensor parameters of each weight in ``seg`` (rows of ``w`` ``[seg rows, cols]``) and
    their group-indexed views stacked along the rows (empty for formats without any)."""
    tensors, views, r = [], [], 0
    for n in seg.row_counts():
        part = w[r:r + n]
        tp = seg.fmt.fit_tensor(part)
        tensors.append(tp)
        views.append(seg.fmt.tensor_view(tp, tuple(part.shape)) if tp else {})
        r += n
    if not views[0]:
        return tensors, {}
    return tensors, {k: _stack_rows([v[k] for v in views]) for k in views[0]}


def _stack_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """Views stacked along the rows; one that is a broadcast (stride 0 along rows and groups) of
    the same values in every part stays a broadcast (a per-tensor table is not copied per block)."""
    first = parts[0]
    if all(p.dim() >= 2 and p.stride(0) == 0 and p.stride(1) == 0 for p in parts) and \
            all(torch.equal(p[:1, :1], first[:1, :1]) for p in parts[1:]):
        return first[:1].expand(sum(p.shape[0] for p in parts), *first.shape[1:])
    return torch.cat(parts)


def _fit(fmt: Format, tile: torch.Tensor, imp: torch.Tensor | None, view: Params) -> Params:
    """``fmt.fit`` of a tile with its slice of the tensor view merged in (``view=`` only when any)."""
    if not view:
        return fmt.fit(tile, imp)
    return {**fmt.fit(tile, imp, view=view), **view}


@torch.no_grad()
def ldlq_solve(
    weight: torch.Tensor, hessian: torch.Tensor, segments: list[Segment], *,
    block_size: int = 128, desc_act: bool = False, static_groups: bool = False,
    damp_percent: float = 0.01, damp_max: float = 1.0, importance: torch.Tensor | None = None,
    fused: bool = True,
) -> LDLQResult:
    """Quantize ``weight`` ``[rows, cols]`` (float32) with the Hessian ``[cols, cols]``.

    :param segments: row ranges covering ``weight`` and the format of each (every format with
        the same :attr:`~quantfoundry.Format.block_width`).
    :param block_size: columns per lazy batch (adjusted: see :func:`lazy_block_size`).
    :param desc_act: act-order: columns in decreasing ``diag(H)``, codes stored permuted
        (``perm``) unless ``static_groups`` (scalar grids only).
    :param static_groups: fit every group's parameters before the loop, on the original weights.
    :param damp_percent: ``λ = damp · mean(diag H)`` added to the diagonal; doubled up to
        ``damp_max`` while a factorisation fails (:class:`HessianError` beyond).
    :param importance: per-column weights for fitting grid parameters (formats that use them,
        e.g. GGUF's imatrix encoders); default none.
    :param fused: on CUDA, run each lazy batch as one Triton kernel when every segment's grid
        is affine (:meth:`Format.affine`) and groups are fitted in the loop.
    """
    w = weight.to(torch.float32).clone()
    rows, cols = w.shape
    widths = {seg.fmt.block_width for seg in segments}
    if len(widths) != 1:
        raise ValueError(f"segments mix block widths {sorted(widths)}; one loop rounds one vector width")
    bw = widths.pop()
    if bw > 1 and desc_act:
        raise ValueError(f"act-order permutes single columns; a block width of {bw} rounds them jointly")
    h, dead = prepare_hessian(hessian.to(device=w.device, dtype=torch.float32))
    groups = [seg.fmt.group_size(cols) for seg in segments]

    static: list[Params] = []
    tensor_params: list[list[Params]] = []
    views: list[Params] = []
    if static_groups:  # groups (and per-tensor parameters) on the original weights, original order
        for seg in segments:
            imp = importance if importance is None else importance.to(w.device)
            tps, view = _fit_tensors(w[seg.rows], seg)
            tensor_params.append(tps)
            fitted = _fit(seg.fmt, w[seg.rows], imp, view)
            static.append(_keep_group_params(fitted, cols // seg.fmt.group_size(cols)))

    perm = None
    if desc_act:
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        w = w[:, perm]
        h = h[perm][:, perm]
        if importance is not None:
            importance = importance.to(w.device)[perm]
    order = perm.tolist() if perm is not None else None
    if not static_groups:  # fitted to the weights in the order their groups are stored
        for seg in segments:
            tps, view = _fit_tensors(w[seg.rows], seg)
            tensor_params.append(tps)
            views.append(view)

    u, damp, tries = inverse_cholesky(h, damp_percent, damp_max)
    del h
    use_fused = fused and bw == 1 and not static_groups and _fused_available(w.device) and all(
        type(seg.fmt).affine is not Format.affine for seg in segments)
    bsz = math.gcd(block_size, *groups) if use_fused else lazy_block_size(block_size, groups, bw)
    if use_fused and bsz < 16:  # tiny batches: the kernel would not pay off
        use_fused, bsz = False, lazy_block_size(block_size, groups, bw)
    codes = [torch.empty(seg.stop - seg.start, cols // bw, dtype=torch.int32, device=w.device)
             for seg in segments]
    fitted: list[list[Params]] = [[] for _ in segments]

    wt = w.T.contiguous()  # [cols, rows]: a column is one contiguous row, updates are row-major
    del w
    valt = torch.empty_like(wt)
    if use_fused:
        _fused_loop(wt, u, segments, groups, bsz, importance, codes, valt, fitted, views)
    else:
        _plain_loop(wt, u, segments, groups, bsz, importance, codes, valt, fitted,
                    static if static_groups else None, order, bw, views)

    if use_fused:  # the kernel's values are a·q + b; store exactly what the codes decode to
        valt = torch.cat([torch.cat(fitted_decode(seg, codes[s], fitted[s]), dim=1)
                          for s, seg in enumerate(segments)]).T.contiguous()
    values = valt.T
    if static_groups:
        params = static
    else:
        params = [{k: torch.cat([p[k] for p in fs], dim=1) for k in fs[0] if not k.startswith("_")}
                  for fs in fitted]  # transient entries are not stored: never concatenated
    if perm is not None:
        inv = torch.argsort(perm)
        values = values[:, inv]
        if static_groups:  # groups are in the original order: store the codes there too
            codes = [c[:, inv] for c in codes]
            perm = None
    return LDLQResult(codes, params, perm, damp, tries, int(dead.sum()), values, tensor_params)


def _fused_available(device: torch.device) -> bool:
    """CUDA with Triton (imported only then: CPU runs never pay for it)."""
    if device.type != "cuda":
        return False
    from . import _triton_ldlq

    return _triton_ldlq.available(device)


def _fused_loop(wt: torch.Tensor, u: torch.Tensor, segments: list[Segment], groups: list[int], bsz: int,
                importance: torch.Tensor | None, codes: list[torch.Tensor], valt: torch.Tensor,
                fitted: list[list[Params]], views: list[Params]) -> None:
    """The column loop with one Triton kernel per lazy batch (every group starts a batch)."""
    from . import _triton_ldlq as fuse

    cols, rows = wt.shape
    lo = torch.empty(rows, device=wt.device)
    hi = torch.empty(rows, device=wt.device)
    a_buf = torch.empty(bsz, rows, device=wt.device)
    b_buf = torch.empty_like(a_buf)
    codes_t = torch.empty(cols, rows, dtype=torch.int32, device=wt.device)  # one copy per batch
    current: list[Params] = [{} for _ in segments]
    for i1 in range(0, cols, bsz):
        i2 = min(i1 + bsz, cols)
        a, b = a_buf[:i2 - i1], b_buf[:i2 - i1]
        for s, seg in enumerate(segments):
            g = groups[s]
            if i1 % g == 0:
                imp = None if importance is None else importance[i1:i1 + g].to(wt.device)
                view = _slice_group(views[s], i1 // g) if views[s] else {}
                current[s] = _keep_group_params(_fit(seg.fmt, wt[i1:i1 + g, seg.rows].T, imp, view), 1)
                fitted[s].append(current[s])
            aff = seg.fmt.affine(current[s], i1 % g, i2 - i1)
            if aff is None:
                raise TypeError(f"{seg.fmt.spec} overrides Format.affine but returned None")
            a[:, seg.rows], b[:, seg.rows] = aff[0].T, aff[1].T
            if i1 % g == 0:  # code bounds: per fitted group
                lo[seg.rows], hi[seg.rows] = float(aff[2]), float(aff[3])
        q, v, e = fuse.gptq_batch(wt[i1:i2], u[i1:i2, i1:i2], a, b, lo, hi)
        codes_t[i1:i2] = q
        valt[i1:i2] = v
        if i2 < cols:
            wt[i2:].addmm_(u[i1:i2, i2:].T, e, alpha=-1.0)
    for s, seg in enumerate(segments):
        codes[s].copy_(codes_t[:, seg.rows].T)


def fitted_decode(seg: Segment, codes: torch.Tensor, fitted: list[Params]) -> list[torch.Tensor]:
    """The values ``codes`` decode to, group by group (``[rows, g]`` pieces)."""
    g = codes.shape[1] // len(fitted)
    return [seg.fmt.decode(codes[:, k * g:(k + 1) * g], p, 0) for k, p in enumerate(fitted)]


def _plain_loop(wt: torch.Tensor, u: torch.Tensor, segments: list[Segment], groups: list[int], bsz: int,
                importance: torch.Tensor | None, codes: list[torch.Tensor], valt: torch.Tensor,
                fitted: list[list[Params]], static: list[Params] | None, order: list[int] | None,
                bw: int, views: list[Params]) -> None:
    """The column loop through the Format interface (any grid, any device): ``bw`` columns
    rounded jointly per step."""
    cols = wt.shape[0]
    current: list[Params] = [{} for _ in segments]
    for i1 in range(0, cols, bsz):
        i2 = min(i1 + bsz, cols)
        w1 = wt[i1:i2].clone()
        err1 = torch.empty_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(0, i2 - i1, bw):
            col = i1 + i
            for s, seg in enumerate(segments):
                g = groups[s]
                if static is not None:
                    src = order[col] if order is not None else col
                    p, col0 = _slice_group(static[s], src // g), src % g
                else:
                    if col % g == 0:
                        tile = w1[i:i + g, seg.rows] if i + g <= i2 - i1 else wt[col:col + g, seg.rows]
                        imp = None if importance is None else importance[col:col + g].to(wt.device)
                        view = _slice_group(views[s], col // g) if views[s] else {}
                        current[s] = _keep_group_params(_fit(seg.fmt, tile.T, imp, view), 1)
                        fitted[s].append(current[s])
                    p, col0 = current[s], col % g
                q = seg.fmt.round(w1[i:i + bw, seg.rows].T, p, col0)  # [rows, 1]: one code per vector
                codes[s][:, col // bw] = q[:, 0].to(torch.int32)
                valt[col:col + bw, seg.rows] = seg.fmt.decode(q, p, col0).T
            if bw == 1:
                err = (w1[i] - valt[col]) / u1[i, i]
                w1[i:].addr_(u1[i, i:], err, alpha=-1.0)
                err1[i] = err
            else:  # E U_BB⁻¹ (transposed: U_BBᵀ err = Eᵀ), then the rest of the batch
                err = torch.linalg.solve_triangular(u1[i:i + bw, i:i + bw].T, w1[i:i + bw] - valt[col:col + bw],
                                                    upper=False)
                w1[i:] -= u1[i:i + bw, i:].T @ err
                err1[i:i + bw] = err
        if i2 < cols:
            wt[i2:].addmm_(u[i1:i2, i2:].T, err1, alpha=-1.0)


@dataclass
class SolvedWeight:
    """One weight's share of a stacked :func:`ldlq_solve`: its format, codes, grid parameters and
    per-tensor parameters (what a :class:`~quantfoundry.QuantizedWeight` is built from)."""

    fmt: Format
    codes: torch.Tensor
    params: Params
    tensor_params: Params


def solve_stacked(weights: list[torch.Tensor], formats: list[Format], hessian: torch.Tensor,
                  **options: object) -> tuple[LDLQResult, list[SolvedWeight]]:
    """:func:`ldlq_solve` over weights that read one input (q/k/v, gate/up), stacked along the
    rows — each its own format, consecutive weights of one format in one segment — and the
    result cut back per weight, in the order given. ``options`` go to :func:`ldlq_solve`."""
    segments: list[Segment] = []
    start = 0
    for w, fmt in zip(weights, formats, strict=True):
        if segments and segments[-1].fmt == fmt:
            segments[-1].tensors = [*segments[-1].row_counts(), w.shape[0]]
            segments[-1].stop += w.shape[0]
        else:
            segments.append(Segment(start, start + w.shape[0], fmt))
        start += w.shape[0]
    stacked = torch.cat([w.to(torch.float32) for w in weights])
    res = ldlq_solve(stacked, hessian, segments, **options)  # type: ignore[arg-type]
    out: list[SolvedWeight] = []
    row = 0
    taken = [0] * len(segments)  # weights of each segment handed out so far
    for w in weights:
        s = next(i for i, seg in enumerate(segments) if seg.start <= row < seg.stop)
        r0, r1 = row - segments[s].start, row - segments[s].start + w.shape[0]
        out.append(SolvedWeight(segments[s].fmt, res.codes[s][r0:r1],
                                {k: v[r0:r1].contiguous() for k, v in res.params[s].items()},
                                res.tensor_params[s][taken[s]]))
        taken[s] += 1
        row += w.shape[0]
    return res, out

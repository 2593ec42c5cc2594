"""GGML K-quants Q2_K … Q6_K (super-blocks of 256), encoded as llama.cpp's ``_ref`` encoders
(``ggml-quants.c``; ``docs/llama-cpp-reference.md`` §1.2–1.5, §2.6–2.8, §2.11–2.14).

Vectorised over all sub-blocks of a tensor; the per-position accumulations run as a Python loop
over the 16 or 32 positions of a sub-block, **in index order, in float32**, because llama.cpp sums
sequentially and a different association changes some blocks' bytes. Candidate searches run
sequentially over candidates with llama.cpp's strict running-best tests.

Per super-block the stored parameters are the fp16 ``d`` (and ``dmin``) and the integer
sub-block scales in GGML's own packing (``scales``: 12 bytes of 6-bit scale/min pairs for
Q4_K/Q5_K, 16 six-bit scales in 12 bytes for Q3_K, 16 nibble pairs for Q2_K, 16 int8 for Q6_K),
so the bytes counted are the bytes written. ``round`` is the rule llama.cpp re-derives codes
with (``fp16(d) × integer scale``); ``fit`` also returns the exact codes llama.cpp writes
(transient ``_L``: sub-blocks whose effective scale is 0 keep the search's codes), which
``quantize`` stores. With an importance vector (imatrix) ``fit`` runs the ``_impl`` encoders.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from quantfoundry import Params

from .backend import native_bytes, native_values
from .legacy import GGMLFormat
from .search import (
    EPS,
    _full,
    _running_max,
    _seq_sum,
    _sqrtf,
    make_q3_quants,
    make_qkx2_quants,
    make_qp_quants,
    make_qx_quants,
)

QK_K = 256


# -- packing ------------------------------------------------------------------------------------
def _pack_2bit(low: torch.Tensor) -> torch.Tensor:
    """2-bit codes ``[..., 256]`` → ``qs[64]``: byte ``32h + l`` holds elements ``128h + 32q + l`` at bits ``2q``."""
    c = low.to(torch.uint8).reshape(*low.shape[:-1], 2, 4, 32)
    shifts = torch.tensor([0, 2, 4, 6], device=low.device, dtype=torch.uint8).reshape(4, 1)
    return (c << shifts).sum(dim=-2, dtype=torch.int32).to(torch.uint8).reshape(*low.shape[:-1], 64)


def _unpack_2bit(qs: torch.Tensor) -> torch.Tensor:
    q = qs.reshape(*qs.shape[:-1], 2, 1, 32).to(torch.int32)
    shifts = torch.tensor([0, 2, 4, 6], device=qs.device, dtype=torch.int32).reshape(4, 1)
    return ((q >> shifts) & 3).reshape(*qs.shape[:-1], QK_K)




def pack_scale_min_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """8 six-bit (scale, min) pairs ``[..., 8]`` → 12 bytes, as ``quantize_row_q4_K_ref``."""
    ls, lm = ls.to(torch.uint8), lm.to(torch.uint8)
    lo = ls[..., :4] | ((ls[..., 4:] >> 4) << 6)
    mid = lm[..., :4] | ((lm[..., 4:] >> 4) << 6)
    hi = (ls[..., 4:] & 0xF) | ((lm[..., 4:] & 0xF) << 4)
    return torch.cat([lo, mid, hi], dim=-1)


def unpack_scale_min_k4(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_scale_min_k4` (``get_scale_min_k4``) → int32 ``[..., 8]`` each."""
    b = b.to(torch.int32)
    sc = torch.cat([b[..., :4] & 63, (b[..., 8:] & 0xF) | ((b[..., :4] >> 6) << 4)], dim=-1)
    m = torch.cat([b[..., 4:8] & 63, (b[..., 8:] >> 4) | ((b[..., 4:8] >> 6) << 4)], dim=-1)
    return sc, m


def _sub_index(col0: int, ncols: int, sub: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    c = torch.arange(col0, col0 + ncols, device=device)
    return torch.div(c, QK_K, rounding_mode="floor"), torch.div(c % QK_K, sub, rounding_mode="floor")


class _KQuant(GGMLFormat):
    block = QK_K
    sub: ClassVar[int]      # elements per sub-block (32 or 16)
    nmax: ClassVar[int]     # largest code

    def group_size(self, in_features: int) -> int:
        return QK_K

    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> Params:
        """Grid parameters of every super-block, and (transient ``_L``) the codes llama.cpp writes:
        the rounding rule's codes, except in sub-blocks whose effective scale is 0, which keep
        the search's codes. With ``importance`` (an imatrix row ``[cols]``, or one per row ``[rows, cols]``) the
        ``_impl`` encoders run."""
        rows, cols = w.shape
        if cols % QK_K:
            raise ValueError(f"{self.ggml_name}: {cols} columns are not whole super-blocks of {QK_K}")
        raw = native_bytes(self.ggml_name, w, importance)
        if raw is not None:  # compiled on CPU (qf_gguf.backend): the stored fields and codes, from the bytes
            qw = self.from_ggml_bytes(raw, (rows, cols))
            return {**qw.params, "_L": self.unpack(qw.packed, (rows, cols))}
        shape = (rows, cols // QK_K, QK_K // self.sub, self.sub)
        x = w.to(torch.float32).reshape(shape)
        # importance [cols] (one for every row) or [rows, cols]
        qw = None if importance is None else importance.to(x.device, torch.float32).reshape(-1, *shape[1:]).expand(shape)
        params = self._fit_superblocks(x, qw)
        rule = self.round(w, params)
        dd, _ = self._scales(params)
        blk, j = _sub_index(0, cols, self.sub, w.device)
        params["_L"] = torch.where(dd[:, blk, j] != 0, rule, params["_L"].to(rule.dtype))
        return params

    def roundtrip(self, w: torch.Tensor, importance: torch.Tensor | None = None, *,
                  for_search: bool = False) -> torch.Tensor:
        """The values of the codes the fit wrote (``_L``: llama.cpp's own codes, which the
        rounding rule reproduces wherever a sub-block's scale is not 0, and which decode to the
        same values where it is), without rounding ``w`` a second time.

        ``for_search`` (ranking candidates: AWQ's grids): on CPU, the compiled *search* kernels
        (``qf_gguf.native.encode(search=True)``: llama.cpp's searches with each candidate's sums
        taken in SIMD lanes, about twice as fast for Q2_K/Q4_K/Q5_K; the same codes in about 98%
        of rows, the rest within a rounding of a tie); elsewhere the exact fit."""
        if for_search:
            raw = native_bytes(self.ggml_name, w, importance, search=True)
            values = None if raw is None else native_values(self.ggml_name, raw)
            if values is not None:
                return values
            if raw is not None:
                qw = self.from_ggml_bytes(raw, tuple(w.shape))
                return self.decode(self.unpack(qw.packed, tuple(w.shape)), qw.params)
        params = self.fit(w, importance)
        return self.decode(params["_L"], params)

    @staticmethod
    def _sigma2_weights(x: torch.Tensor, qw: torch.Tensor, factor: float) -> torch.Tensor:
        """``qw * sqrtf(sigma2 + x²)`` with ``sigma2 = factor * Σx² / 256`` over each super-block."""
        rows, k = x.shape[:2]
        sb = x.reshape(rows, k, QK_K)
        sum_x2 = _seq_sum(sb * sb)
        sigma2 = (sum_x2 * factor) / _full(sum_x2, float(QK_K))
        return qw * _sqrtf(sigma2[:, :, None, None] + x * x)

    def _scales(self, params: Params) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Effective per-sub-block scale (and min) ``[rows, k, n_sub]`` in float32, kept for the
        last parameters seen: GPTQ rounds a weight column block by column block with one fit
        (the memo holds those very tensors, so it is never taken for others; an in-place change
        bumps their version)."""
        fields = tuple(params[k] for k in ("d", "dmin", "scales") if k in params)
        versions = tuple(t._version for t in fields)
        memo = self._memo
        if memo is not None and len(memo[0]) == len(fields) and all(a is b for a, b in zip(memo[0], fields)) \
                and memo[1] == versions:
            return memo[2]
        out = self._effective_scales(params)
        object.__setattr__(self, "_memo", (fields, versions, out))
        return out

    _memo: tuple | None = None

    def _effective_scales(self, params: Params) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def _per_column(self, t: torch.Tensor, col0: int, ncols: int) -> torch.Tensor:
        """A per-sub-block tensor ``[rows, k, n_sub]`` spread over columns ``[col0, col0 +
        ncols)`` → ``[rows, ncols]``: a broadcast where the columns are whole sub-blocks (whole
        rows, AWQ's candidates), an index gather elsewhere (GPTQ's column blocks)."""
        sub = self.sub
        if col0 % sub == 0 and ncols % sub == 0:
            rows = t.shape[0]
            s0, count = col0 // sub, ncols // sub
            flat = t.reshape(rows, -1)[:, s0:s0 + count]
            return flat.unsqueeze(-1).expand(rows, count, sub).reshape(rows, ncols)
        blk, j = _sub_index(col0, ncols, sub, t.device)
        return t[:, blk, j]

    def round(self, w: torch.Tensor, params: Params, col0: int = 0) -> torch.Tensor:
        dd, dm = self._scales(params)
        dd = self._per_column(dd, col0, w.shape[1])
        x = w.to(torch.float32)
        num = x if dm is None else x + self._per_column(dm, col0, w.shape[1])
        safe = torch.where(dd != 0, dd, torch.ones_like(dd))
        q = torch.clamp(torch.round(num / safe), self.lo, self.nmax) + self.offset
        return torch.where(dd != 0, q, torch.full_like(q, float(self.offset))).to(torch.int32)  # any code: value 0·q

    def affine(self, params: Params, col0: int, ncols: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """``value = dd·(code − offset) − dm`` = ``a·code + b``; the rounding rule's codes."""
        dd, dm = self._scales(params)
        a = self._per_column(dd, col0, ncols)
        b = -a * float(self.offset)
        if dm is not None:
            b = b - self._per_column(dm, col0, ncols)
        return a, b, self.lo + self.offset, self.nmax + self.offset

    def decode(self, codes: torch.Tensor, params: Params, col0: int = 0) -> torch.Tensor:
        dd, dm = self._scales(params)
        q = (codes - self.offset).to(torch.float32)
        y = self._per_column(dd, col0, codes.shape[1]) * q
        return y if dm is None else y - self._per_column(dm, col0, codes.shape[1])

    lo: ClassVar[int] = 0       # smallest code before the offset
    offset: ClassVar[int] = 0   # added to the rounded value to make the stored code


class _Q45K(_KQuant):
    """Q4_K / Q5_K: 8 sub-blocks of 32, asymmetric, 6-bit scales and mins."""

    sub = 32
    rmin: ClassVar[float]
    nstep: ClassVar[int]

    def _fit_superblocks(self, x: torch.Tensor, qw: torch.Tensor | None) -> Params:
        rows, k, nsub, n = x.shape
        flat = x.reshape(-1, n)
        if qw is None:  # quantize_row_q{4,5}_K_ref
            sum_x2 = _seq_sum(flat * flat)
            av_x = _sqrtf(sum_x2 / _full(sum_x2, 32.0))
            weights = av_x[:, None] + flat.abs()
            scales, mins, L = make_qkx2_quants(flat, weights, self.nmax, self.rmin, 0.1, self.nstep)
            scales, mins = scales.reshape(rows, k, nsub), mins.reshape(rows, k, nsub)
            max_scale = _running_max(scales)
            max_min = _running_max(mins)
            inv_scale = torch.where(max_scale > 0, _full(max_scale, 63.0) / torch.where(max_scale > 0, max_scale, 1.0), 0.0)
            inv_min = torch.where(max_min > 0, _full(max_min, 63.0) / torch.where(max_min > 0, max_min, 1.0), 0.0)
            ls = torch.clamp(torch.round(inv_scale[..., None] * scales).to(torch.int64) & 0xFF, max=63)
            lm = torch.clamp(torch.round(inv_min[..., None] * mins).to(torch.int64) & 0xFF, max=63)
            d = (max_scale / _full(max_scale, 63.0)).to(torch.float16)
            dmin = (max_min / _full(max_min, 63.0)).to(torch.float16)
        else:  # quantize_row_q{4,5}_K_impl with quant_weights
            weights = self._sigma2_weights(x, qw, 2.0).reshape(-1, n)
            sw = _seq_sum(weights).reshape(-1, nsub)
            scales, mins, L = make_qkx2_quants(flat, weights, self.nmax, -0.9, 0.05, 36)
            d_block, ls = make_qp_quants(scales.reshape(-1, nsub), 63, sw)
            m_block, lm = make_qp_quants(mins.reshape(-1, nsub), 63, sw)
            ls, lm = (ls & 0xFF).reshape(rows, k, nsub), (lm & 0xFF).reshape(rows, k, nsub)
            if self.nmax == 31:  # Q5_K clamps, Q4_K does not
                ls, lm = torch.clamp(ls, max=63), torch.clamp(lm, max=63)
            d, dmin = d_block.reshape(rows, k).to(torch.float16), m_block.reshape(rows, k).to(torch.float16)
        return {"d": d, "dmin": dmin, "scales": pack_scale_min_k4(ls, lm), "_L": L.reshape(rows, k * QK_K)}


    def _effective_scales(self, params: Params) -> tuple[torch.Tensor, torch.Tensor | None]:
        sc, m = unpack_scale_min_k4(params["scales"])
        return params["d"].float()[..., None] * sc.float(), params["dmin"].float()[..., None] * m.float()


class Q4_K(_Q45K):
    name = "q4-k"
    ggml_name = "Q4_K"
    ggml_type = 12
    nmax = 15
    rmin = -1.0
    nstep = 20
    fields = (("d", torch.float16, 1), ("dmin", torch.float16, 1), ("scales", torch.uint8, 12),
              ("packed", torch.uint8, 128))
    description = "GGML Q4_K: 4-bit codes, 6-bit scale and min per 32, fp16 d/dmin per 256"

    def code_bits(self) -> int:
        return 4

    def _code_bytes(self, codes: torch.Tensor) -> torch.Tensor:
        c = codes.to(torch.uint8).reshape(*codes.shape[:-1], 4, 2, 32)
        return (c[..., 0, :] | (c[..., 1, :] << 4)).reshape(*codes.shape[:-1], 128)

    def _codes_of(self, raw: torch.Tensor) -> torch.Tensor:
        q = raw.reshape(*raw.shape[:-1], 4, 1, 32)
        return torch.cat([q & 0xF, q >> 4], dim=-2).reshape(*raw.shape[:-1], QK_K).to(torch.int32)


class Q5_K(_Q45K):
    name = "q5-k"
    ggml_name = "Q5_K"
    ggml_type = 13
    nmax = 31
    rmin = -0.5
    nstep = 15
    fields = (("d", torch.float16, 1), ("dmin", torch.float16, 1), ("scales", torch.uint8, 12),
              ("packed", torch.uint8, 160))  # packed = qh[32] then qs[128]
    description = "GGML Q5_K: 5-bit codes, 6-bit scale and min per 32, fp16 d/dmin per 256"

    def code_bits(self) -> int:
        return 5

    def _code_bytes(self, codes: torch.Tensor) -> torch.Tensor:
        c = codes.to(torch.uint8).reshape(*codes.shape[:-1], 4, 2, 32)
        qs = ((c[..., 0, :] & 0xF) | ((c[..., 1, :] & 0xF) << 4)).reshape(*codes.shape[:-1], 128)
        shifts = torch.arange(8, device=codes.device, dtype=torch.uint8).reshape(4, 2, 1)
        qh = (((c >> 4) & 1) << shifts).sum(dim=(-3, -2), dtype=torch.int32).to(torch.uint8)
        return torch.cat([qh, qs], dim=-1)

    def _codes_of(self, raw: torch.Tensor) -> torch.Tensor:
        qh, qs = raw[..., :32], raw[..., 32:]
        q = qs.reshape(*qs.shape[:-1], 4, 1, 32)
        low = torch.cat([q & 0xF, q >> 4], dim=-2).to(torch.int32)  # [..., 4, 2, 32]
        shifts = torch.arange(8, device=raw.device, dtype=torch.uint8).reshape(4, 2, 1)
        high = ((qh.unsqueeze(-2).unsqueeze(-2) >> shifts) & 1).to(torch.int32)
        return (low | (high << 4)).reshape(*raw.shape[:-1], QK_K)


class Q6_K(_KQuant):
    name = "q6-k"
    ggml_name = "Q6_K"
    ggml_type = 14
    sub = 16
    nmax = 31
    lo = -32
    offset = 32
    fields = (("packed", torch.uint8, 192), ("scales", torch.int8, 16), ("d", torch.float16, 1))
    description = "GGML Q6_K: 6-bit codes, int8 scale per 16, fp16 d per 256"

    def code_bits(self) -> int:
        return 6

    def _fit_superblocks(self, x: torch.Tensor, qw: torch.Tensor | None) -> Params:
        rows, k, nsub, n = x.shape
        # the _impl path weights the search with the raw imatrix values (its sigma2 variant is commented out)
        scales, L = make_qx_quants(x.reshape(-1, n), 32, None if qw is None else qw.reshape(-1, n))
        scales = scales.reshape(rows, k, nsub)
        first = scales.abs().argmax(-1, keepdim=True)
        max_scale = scales.gather(-1, first).squeeze(-1)
        zero = max_scale.abs() < EPS
        safe = torch.where(zero, torch.ones_like(max_scale), max_scale)
        iscale = _full(max_scale, -128.0) / safe
        d = (torch.ones_like(iscale) / iscale).to(torch.float16)
        sc = torch.clamp(torch.round(iscale[..., None] * scales), max=127)
        d = torch.where(zero, torch.zeros_like(d), d)
        sc = torch.where(zero[..., None], torch.zeros_like(sc), sc).to(torch.int8)
        L = L.reshape(rows, k, QK_K)
        L = torch.where(zero[..., None], torch.zeros_like(L), L)  # an all-zero block is memset to 0
        return {"d": d, "scales": sc, "_L": L.reshape(rows, k * QK_K)}


    def _effective_scales(self, params: Params) -> tuple[torch.Tensor, torch.Tensor | None]:
        return params["d"].float()[..., None] * params["scales"].float(), None

    def _code_bytes(self, codes: torch.Tensor) -> torch.Tensor:
        c = codes.to(torch.uint8).reshape(*codes.shape[:-1], 2, 4, 32)
        ql = torch.cat([(c[..., 0, :] & 0xF) | ((c[..., 2, :] & 0xF) << 4),
                        (c[..., 1, :] & 0xF) | ((c[..., 3, :] & 0xF) << 4)], dim=-1)  # [..., 2, 64]
        shifts = torch.tensor([0, 2, 4, 6], device=codes.device, dtype=torch.uint8).reshape(4, 1)
        qh = (((c >> 4) & 3) << shifts).sum(dim=-2, dtype=torch.int32).to(torch.uint8)  # [..., 2, 32]
        lead = codes.shape[:-1]
        return torch.cat([ql.reshape(*lead, 128), qh.reshape(*lead, 64)], dim=-1)

    def _codes_of(self, raw: torch.Tensor) -> torch.Tensor:
        lead = raw.shape[:-1]
        ql = raw[..., :128].reshape(*lead, 2, 2, 32).to(torch.int32)  # [h, half, position]
        qh = raw[..., 128:].reshape(*lead, 2, 1, 32).to(torch.int32)
        low = torch.stack([ql[..., 0, :] & 0xF, ql[..., 1, :] & 0xF, ql[..., 0, :] >> 4, ql[..., 1, :] >> 4],
                          dim=-2)  # quarters 0..3
        shifts = torch.tensor([0, 2, 4, 6], device=raw.device, dtype=torch.int32).reshape(4, 1)
        high = (qh >> shifts) & 3
        return (low | (high << 4)).reshape(*lead, QK_K)


class Q2_K(_KQuant):
    name = "q2-k"
    ggml_name = "Q2_K"
    ggml_type = 10
    sub = 16
    nmax = 3
    fields = (("scales", torch.uint8, 16), ("packed", torch.uint8, 64), ("d", torch.float16, 1),
              ("dmin", torch.float16, 1))
    description = "GGML Q2_K: 2-bit codes, 4-bit scale and min per 16, fp16 d/dmin per 256"

    def code_bits(self) -> int:
        return 2

    def _fit_superblocks(self, x: torch.Tensor, qw: torch.Tensor | None) -> Params:
        rows, k, nsub, n = x.shape
        flat = x.reshape(-1, n)
        if qw is None:  # quantize_row_q2_K_ref
            scales, mins, L = make_qkx2_quants(flat, flat.abs(), 3, -0.5, 0.1, 15, use_mad=True)
            scales, mins = scales.reshape(rows, k, nsub), mins.reshape(rows, k, nsub)
            max_scale, max_min = _running_max(scales), _running_max(mins)
            q4 = torch.tensor(15.0, device=x.device)
            has_s, has_m = max_scale > 0, max_min > 0
            iss = torch.where(has_s, q4 / torch.where(has_s, max_scale, 1.0), 0.0)
            ism = torch.where(has_m, q4 / torch.where(has_m, max_min, 1.0), 0.0)
            ls = torch.round(iss[..., None] * scales).to(torch.int64)
            lm = torch.round(ism[..., None] * mins).to(torch.int64)
            d = torch.where(has_s, max_scale / q4, 0.0).to(torch.float16)
            dmin = torch.where(has_m, max_min / q4, 0.0).to(torch.float16)
        else:  # quantize_row_q2_K_impl: sigma2 without the factor 2, MSE search, make_qp_quants scales
            weights = self._sigma2_weights(x, qw, 1.0).reshape(-1, n)
            sw = _seq_sum(weights).reshape(-1, nsub)
            scales, mins, L = make_qkx2_quants(flat, weights, 3, -0.9, 0.05, 36)
            dm, ls = make_qp_quants(scales.reshape(-1, nsub), 15, sw)
            mm, lm = make_qp_quants(mins.reshape(-1, nsub), 15, sw)
            ls, lm = ls.reshape(rows, k, nsub), lm.reshape(rows, k, nsub)
            d, dmin = dm.reshape(rows, k).to(torch.float16), mm.reshape(rows, k).to(torch.float16)
        packed = ((ls & 0xFF) | ((lm << 4) & 0xFF)).to(torch.uint8)
        return {"d": d, "dmin": dmin, "scales": packed, "_L": L.reshape(rows, k * QK_K)}


    def _effective_scales(self, params: Params) -> tuple[torch.Tensor, torch.Tensor | None]:
        b = params["scales"].to(torch.int32)
        return params["d"].float()[..., None] * (b & 0xF).float(), params["dmin"].float()[..., None] * (b >> 4).float()

    def _code_bytes(self, codes: torch.Tensor) -> torch.Tensor:
        return _pack_2bit(codes)

    def _codes_of(self, raw: torch.Tensor) -> torch.Tensor:
        return _unpack_2bit(raw)


class Q3_K(_KQuant):
    name = "q3-k"
    ggml_name = "Q3_K"
    ggml_type = 11
    sub = 16
    nmax = 3
    lo = -4
    offset = 4
    fields = (("packed", torch.uint8, 96), ("scales", torch.uint8, 12), ("d", torch.float16, 1))  # hmask, qs
    description = "GGML Q3_K: 3-bit codes, 6-bit scale per 16, fp16 d per 256"

    def code_bits(self) -> int:
        return 3

    def _fit_superblocks(self, x: torch.Tensor, qw: torch.Tensor | None) -> Params:
        rows, k, nsub, n = x.shape
        if qw is None:  # quantize_row_q3_K_ref
            scales, L = make_q3_quants(x.reshape(-1, n), 4)
            scales = scales.reshape(rows, k, nsub)
            first = scales.abs().argmax(-1, keepdim=True)
            max_scale = scales.gather(-1, first).squeeze(-1)
            has = max_scale != 0
            iscale = _full(max_scale, -32.0) / torch.where(has, max_scale, torch.ones_like(max_scale))
            q = torch.round(iscale[..., None] * scales).to(torch.int64)
            q = ((q + 128) & 0xFF) - 128  # C's int -> int8_t
            s6 = torch.where(has[..., None], torch.clamp(q, -32, 31) + 32, torch.zeros_like(q))
            d = torch.where(has, torch.ones_like(iscale) / iscale, torch.zeros_like(iscale)).to(torch.float16)
        else:  # quantize_row_q3_K_impl: weighted make_qx_quants for codes, then for the scales
            weights = self._sigma2_weights(x, qw, 2.0).reshape(-1, n)
            sw = _seq_sum(weights).reshape(-1, nsub)
            scales, L = make_qx_quants(x.reshape(-1, n), 4, weights)
            d_block, s6 = make_qx_quants(scales.reshape(-1, nsub), 32, sw)
            s6 = s6.reshape(rows, k, nsub).to(torch.int64)
            d = d_block.reshape(rows, k).to(torch.float16)
        return {"d": d, "scales": _pack_q3_scales(s6), "_L": L.reshape(rows, k * QK_K)}


    def _effective_scales(self, params: Params) -> tuple[torch.Tensor, torch.Tensor | None]:
        s6 = _unpack_q3_scales(params["scales"])
        return params["d"].float()[..., None] * (s6 - 32).float(), None

    def _code_bytes(self, codes: torch.Tensor) -> torch.Tensor:
        c = codes.to(torch.int32)
        high = ((c >> 2) & 1).to(torch.uint8).reshape(*codes.shape[:-1], 8, 32)  # bit j/32 of hmask[j%32]
        shifts = torch.arange(8, device=codes.device, dtype=torch.uint8).reshape(8, 1)
        hmask = (high << shifts).sum(dim=-2, dtype=torch.int32).to(torch.uint8)
        return torch.cat([hmask, _pack_2bit(c & 3)], dim=-1)

    def _codes_of(self, raw: torch.Tensor) -> torch.Tensor:
        hmask, qs = raw[..., :32], raw[..., 32:]
        shifts = torch.arange(8, device=raw.device, dtype=torch.int32).reshape(8, 1)
        high = ((hmask.to(torch.int32).unsqueeze(-2) >> shifts) & 1).reshape(*raw.shape[:-1], QK_K)
        return _unpack_2bit(qs) | (high << 2)


def _pack_q3_scales(s6: torch.Tensor) -> torch.Tensor:
    """16 six-bit scales ``[..., 16]`` → 12 bytes as ``quantize_row_q3_K_ref``."""
    s = s6.to(torch.int32)
    low = (s[..., :8] & 0xF) | ((s[..., 8:] & 0xF) << 4)
    hi = (s >> 4).reshape(*s.shape[:-1], 4, 4)  # [j // 4, j % 4]
    shifts = torch.tensor([0, 2, 4, 6], device=s.device, dtype=torch.int32).reshape(4, 1)
    top = (hi << shifts).sum(dim=-2)
    return torch.cat([low, top], dim=-1).to(torch.uint8)


def _unpack_q3_scales(b: torch.Tensor) -> torch.Tensor:
    b = b.to(torch.int32)
    low = torch.cat([b[..., :8] & 0xF, b[..., :8] >> 4], dim=-1)
    shifts = torch.tensor([0, 2, 4, 6], device=b.device, dtype=torch.int32).reshape(4, 1)
    top = ((b[..., 8:].unsqueeze(-2) >> shifts) & 3).reshape(*b.shape[:-1], 16)
    return low | (top << 4)


KQUANT_FORMATS: tuple[type[GGMLFormat], ...] = (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)

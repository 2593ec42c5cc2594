import sys; sys.path.insert(0, '/tmp/qref')
import numpy as np, ctypes
import ref
from ref import *
lib = ctypes.CDLL("/root/.cache/llama.cpp-lcp0.3.36/build/bin/libggml-base.so")
q = lib.ggml_quantize_chunk
q.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]; q.restype = ctypes.c_size_t
# variant: make_qkx_quants using float64 accumulation for the error sums only
orig = ref.make_qkx_quants
def variant(n, nmax, x, weights, rmin, rdelta, nstep, use_mad, v3=False):
    xs = np.array(x, np.float32); w = np.array(weights, np.float32)
    mn = min(F(0), xs.min()); mx = xs.max()
    sum_w = F(np.sum(w)); sum_x = F(np.sum(w*xs))   # pairwise, not sequential
    if mx == mn: return F(0), -mn, [0]*n
    iscale = F(nmax)/(mx-mn); scale = F(1)/iscale
    L = np.clip(np.round(iscale*(xs-mn)), 0, nmax)
    diff = scale*L.astype(np.float32) + mn - xs; best = F(np.sum(w*(np.abs(diff) if use_mad else diff*diff)))
    for is_ in range(nstep+1):
        isc = (F(rmin) + F(rdelta)*F(is_) + F(nmax))/(mx-mn)
        La = np.clip(np.round(isc*(xs-mn)), 0, nmax).astype(np.float32)
        sl = F(np.sum(w*La)); sl2 = F(np.sum(w*La*La)); sxl = F(np.sum(w*La*xs))
        D = sum_w*sl2 - sl*sl
        if D > 0:
            ts = (sum_w*sxl - sum_x*sl)/D; tm = (sl2*sum_x - sl*sxl)/D
            if tm > 0: tm = F(0); ts = sxl/sl2
            d2 = ts*La + tm - xs; cur = F(np.sum(w*(np.abs(d2) if use_mad else d2*d2)))
            if cur < best: L = La; best = cur; scale = ts; mn = tm
    return scale, -mn, [int(v) for v in L]
rng = np.random.default_rng(9)
NB = 300
X = (rng.standard_normal((NB, 256)) * 0.02).astype(np.float32)
for label, fn in (('sequential', orig), ('numpy-pairwise', variant)):
    ref.make_qkx_quants = fn
    ok = 0
    for b in range(NB):
        x = X[b].copy(); out = np.zeros(144, np.uint8)
        q(12, x.ctypes.data, out.ctypes.data, 0, 1, 256, None)
        ok += bytes(out) == ref.q45K_block([F(v) for v in x], 15)
    print('Q4_K ref with', label, 'sums:', ok, '/', NB)

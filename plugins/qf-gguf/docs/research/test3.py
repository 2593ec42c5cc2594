import sys; sys.path.insert(0, '/tmp/qref')
import numpy as np, ctypes
from ref import *
lib = ctypes.CDLL("/root/.cache/llama.cpp-lcp0.3.36/build/bin/libggml-base.so")
q = lib.ggml_quantize_chunk
q.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]; q.restype = ctypes.c_size_t
T = dict(Q2_K=(10,84,q2K_block), Q3_K=(11,110,q3K_block), Q4_K=(12,144,lambda x,qw=None: q45K_block(x,15,qw)), Q5_K=(13,176,lambda x,qw=None: q45K_block(x,31,qw)), Q6_K=(14,210,q6K_block))
rng = np.random.default_rng(7)
NB = int(sys.argv[1])
X = (rng.standard_normal((NB, 256)) * rng.uniform(1e-3, 3, (NB, 1))).astype(np.float32)
X[::7] = (rng.standard_t(2, (len(X[::7]), 256))*0.03).astype(np.float32)
X[1::11, :48] = 0
QW = (rng.uniform(0.0, 5, (NB, 256))**2).astype(np.float32)
for name, (tid, bs, fn) in T.items():
    for use_im in (False, True):
        ok = 0
        for b in range(NB):
            x = X[b].copy(); qw = QW[b].copy()
            out = np.zeros(bs, np.uint8)
            q(tid, x.ctypes.data, out.ctypes.data, 0, 1, 256, qw.ctypes.data if use_im else None)
            ok += bytes(out) == fn([F(v) for v in x], [F(v) for v in qw] if use_im else None)
        print(name, 'imatrix' if use_im else 'ref', ok, '/', NB, flush=True)

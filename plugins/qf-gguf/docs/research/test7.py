import sys; sys.path.insert(0, '/tmp/qref')
import numpy as np, ctypes
from ref import *
lib = ctypes.CDLL("/root/.cache/llama.cpp-lcp0.3.36/build/bin/libggml-base.so")
q = lib.ggml_quantize_chunk
q.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]; q.restype = ctypes.c_size_t
T = dict(Q2_K=(10,84,q2K_block), Q3_K=(11,110,q3K_block), Q4_K=(12,144,lambda x,qw=None: q45K_block(x,15,qw)), Q5_K=(13,176,lambda x,qw=None: q45K_block(x,31,qw)), Q6_K=(14,210,q6K_block))
rng = np.random.default_rng(5)
for name, (tid, bs, fn) in T.items():
    ok = 0; tot = 0; zero_sc = 0
    for t in range(20):
        x = (rng.standard_normal(256)*1e-5).astype(np.float32)
        x[rng.integers(0,256,3)] = rng.standard_normal(3).astype(np.float32)*10
        out = np.zeros(bs, np.uint8); q(tid, x.ctypes.data, out.ctypes.data, 0, 1, 256, None)
        tot += 1; ok += bytes(out) == fn([F(v) for v in x], None)
    print(name, ok, '/', tot)

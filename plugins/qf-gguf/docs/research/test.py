import sys; sys.path.insert(0, '/tmp/qref')
import numpy as np, ctypes
from ref import *
lib = ctypes.CDLL("/root/.cache/llama.cpp-lcp0.3.36/build/bin/libggml-base.so")
q = lib.ggml_quantize_chunk
q.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]; q.restype = ctypes.c_size_t
T = dict(Q2_K=(10,84,q2K_block), Q3_K=(11,110,q3K_block), Q4_K=(12,144,lambda x,qw=None: q45K_block(x,15,qw)), Q5_K=(13,176,lambda x,qw=None: q45K_block(x,31,qw)), Q6_K=(14,210,q6K_block))
rng = np.random.default_rng(1)
def rows():
    yield rng.standard_normal(256).astype(np.float32)*0.02
    yield (rng.standard_t(3, 256)*0.05).astype(np.float32)
    z = rng.standard_normal(256).astype(np.float32); z[:40] = 0; z[100:116] = 0.5; yield z
    z = np.abs(rng.standard_normal(256)).astype(np.float32); yield z
    z = -np.abs(rng.standard_normal(256)).astype(np.float32)*1e-3; yield z
    z = rng.standard_normal(256).astype(np.float32); z[7] = 40; yield z
    for _ in range(6): yield (rng.standard_normal(256)*rng.uniform(1e-4, 10)).astype(np.float32)
for name, (tid, bs, fn) in T.items():
    for use_im in (False, True):
        bad = 0; tot = 0
        for x in rows():
            qw = (rng.uniform(0.01, 5, 256)**2).astype(np.float32) if use_im else None
            out = np.zeros(bs, np.uint8)
            q(tid, x.ctypes.data, out.ctypes.data, 0, 1, 256, qw.ctypes.data if use_im else None)
            xs = [F(v) for v in x]
            mine = fn(xs, None if qw is None else [F(v) for v in qw])
            tot += 1
            if bytes(out) != mine:
                bad += 1
                diff = [i for i in range(bs) if out[i] != mine[i]]
                print(name, 'imatrix' if use_im else 'ref', 'mismatch bytes', diff[:10])
        print(name, 'imatrix' if use_im else 'ref', f'{tot-bad}/{tot} exact')

import sys; sys.path.insert(0, '/tmp/qref'); sys.path.insert(0, '/root/.cache/llama.cpp-lcp0.3.36/llama_cpp_python-0.3.36/vendor/llama.cpp/gguf-py')
import numpy as np, ctypes
from ref import *; from legacy import *
import gguf
from gguf.quants import quantize as gq
from gguf.constants import GGMLQuantizationType as G
lib = ctypes.CDLL("/root/.cache/llama.cpp-lcp0.3.36/build/bin/libggml-base.so")
q = lib.ggml_quantize_chunk
q.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]; q.restype = ctypes.c_size_t
rng = np.random.default_rng(2)
n = 512; nrow = 64
X = (rng.standard_normal((nrow, n)) * rng.uniform(1e-3, 3, (nrow, 1))).astype(np.float32)
X[3, :64] = 0; X[5] = np.abs(X[5]); X[6, 10] = 100
types = dict(Q4_0=(2,18,G.Q4_0), Q4_1=(3,20,G.Q4_1), Q5_0=(6,22,G.Q5_0), Q5_1=(7,24,G.Q5_1), Q8_0=(8,34,G.Q8_0))
for name,(tid,bs,g) in types.items():
    out = np.zeros(nrow*n//32*bs, np.uint8)
    q(tid, X.ctypes.data, out.ctypes.data, 0, nrow, n, None)
    ref = gq(X, g).reshape(-1)
    print(name, 'no-imatrix ggml == gguf-py:', np.array_equal(out, ref))
qw = (rng.uniform(0.01, 5, n)**2).astype(np.float32)
for name,(tid,bs,g) in types.items():
    if name == 'Q8_0': continue
    out = np.zeros(nrow*n//32*bs, np.uint8)
    q(tid, X.ctypes.data, out.ctypes.data, 0, nrow, n, qw.ctypes.data)
    ok = 0
    for r in range(nrow):
        x = [F(v) for v in X[r]]; w = [F(v) for v in qw]
        mine = {'Q4_0': lambda: q40_row_impl(x, w), 'Q5_0': lambda: q50_row_impl(x, w), 'Q4_1': lambda: q41_51_row_impl(x, w, 15), 'Q5_1': lambda: q41_51_row_impl(x, w, 31)}[name]()
        ok += bytes(out[r*n//32*bs:(r+1)*n//32*bs]) == mine
    print(name, 'imatrix scalar-ref exact rows:', ok, '/', nrow)

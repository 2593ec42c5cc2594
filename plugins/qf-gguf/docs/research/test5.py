import sys; sys.path.insert(0, '/root/.cache/llama.cpp-lcp0.3.36/llama_cpp_python-0.3.36/vendor/llama.cpp/gguf-py')
import numpy as np, ctypes
from gguf.quants import dequantize as gdq
from gguf.constants import GGMLQuantizationType as G
lib = ctypes.CDLL("/root/.cache/llama.cpp-lcp0.3.36/build/bin/libggml-base.so")
q = lib.ggml_quantize_chunk
q.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]; q.restype = ctypes.c_size_t
rng = np.random.default_rng(3)
n, nrow = 1024, 32
X = (rng.standard_normal((nrow, n))*0.05).astype(np.float32)
for name, tid, bs, blk in [('Q4_0',2,18,32),('Q4_1',3,20,32),('Q5_0',6,22,32),('Q5_1',7,24,32),('Q8_0',8,34,32),('Q2_K',10,84,256),('Q3_K',11,110,256),('Q4_K',12,144,256),('Q5_K',13,176,256),('Q6_K',14,210,256),('BF16',30,2,1),('F16',1,2,1)]:
    out = np.zeros(nrow*n//blk*bs, np.uint8)
    q(tid, X.ctypes.data, out.ctypes.data, 0, nrow, n, None)
    fn = getattr(lib, 'dequantize_row_' + (name.lower()[:-1]+'K' if name.endswith('_K') else name.lower()), None) if name not in ('BF16','F16') else None
    g = gdq(out.reshape(nrow, -1), getattr(G, name)).reshape(-1)
    if fn is not None:
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        y = np.zeros(nrow*n, np.float32); fn(out.ctypes.data, y.ctypes.data, nrow*n)
        print(name, 'gguf-py dequant bit-equal to ggml dequantize_row:', np.array_equal(y.view(np.uint32), g.astype(np.float32).view(np.uint32)))
    else:
        print(name, 'roundtrip ok shape', g.shape)

import sys; sys.path.insert(0, '/root/.cache/llama.cpp-lcp0.3.36/llama_cpp_python-0.3.36/vendor/llama.cpp/gguf-py')
import numpy as np, ctypes
from gguf.quants import quantize as gq
from gguf.constants import GGMLQuantizationType as G
lib = ctypes.CDLL("/root/.cache/llama.cpp-lcp0.3.36/build/bin/libggml-base.so")
q = lib.ggml_quantize_chunk
q.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]; q.restype = ctypes.c_size_t
x = np.zeros((1,256), np.float32)
for name, tid, bs in [('Q4_0',2,18),('Q4_1',3,20),('Q5_0',6,22),('Q5_1',7,24),('Q8_0',8,34),('Q2_K',10,84),('Q3_K',11,110),('Q4_K',12,144),('Q5_K',13,176),('Q6_K',14,210)]:
    out = np.zeros(256//(32 if bs<40 else 256)*bs, np.uint8)
    q(tid, x.ctypes.data, out.ctypes.data, 0, 1, 256, None)
    print(name, out[:bs].tobytes().hex())
    if bs < 40: print('  gguf-py', gq(x, getattr(G,name))[0,:bs].tobytes().hex())

"""qf-gguf: GGML block formats for QuantFoundry, bit-exact with llama.cpp's encoders."""

from .kquants import Q2_K, Q3_K, Q4_K, Q5_K, Q6_K
from .legacy import Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, GGMLFormat

__all__ = ["GGMLFormat", "Q2_K", "Q3_K", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0"]

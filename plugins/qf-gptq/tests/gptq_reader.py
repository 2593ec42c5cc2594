"""An independent reader of GPTQ (v1) checkpoints, written from the published layout
(AutoGPTQ's ``QuantLinear.pack`` and its torch dequantization), for the tests. It shares no
code with qf: safetensors are read with the ``safetensors`` library, bits are pulled out of
the int32 words one code at a time with explicit word/shift arithmetic.

``qweight`` ``[in·b/32, out]``: input row ``k`` of output column ``o`` is at bit ``k·b`` of the
column's bitstream (word ``k·b // 32``, shift ``k·b % 32``; at 3 bits a code may straddle two
words, as AutoGPTQ's ``pack`` splits codes 10 and 21 of every 32). ``qzeros`` is packed the
same way along outputs and holds ``zero − 1`` (GPTQModel's ``checkpoint_format: gptq_v2``:
``zero`` itself). ``W[o, k] = scales[g_idx[k], o] ·
(q[k, o] − zero[g_idx[k], o])``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.torch import load_file


def unpack_along_first(words: np.ndarray, bits: int, n: int) -> np.ndarray:
    """``words`` int32 ``[n·bits/32, m]`` → codes ``[n, m]`` (bitstream down each column)."""
    u = words.astype(np.int64) & 0xFFFFFFFF
    out = np.zeros((n, words.shape[1]), dtype=np.int64)
    mask = (1 << bits) - 1
    for k in range(n):
        bit = k * bits
        w, s = divmod(bit, 32)
        v = u[w] >> s
        if s + bits > 32:  # straddles into the next word
            v = v | (u[w + 1] << (32 - s))
        out[k] = v & mask
    return out


def read_gptq(folder: Path) -> tuple[dict, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(quantization_config, dequantized weights [out, in] float64 by module, float tensors)``."""
    folder = Path(folder)
    qcfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "gptq"
    zero_offset = {"gptq": 1, "gptq_v2": 0}[qcfg.get("checkpoint_format", "gptq")]
    bits = qcfg["bits"]
    tensors: dict[str, np.ndarray] = {}
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    for f in files:
        for k, t in load_file(str(folder / f)).items():
            tensors[k] = t.numpy() if not t.is_floating_point() else t.double().numpy()
    weights = {}
    for key in [k for k in tensors if k.endswith(".qweight")]:
        prefix = key.removesuffix(".qweight")
        qweight, qzeros = tensors[f"{prefix}.qweight"], tensors[f"{prefix}.qzeros"]
        scales, g_idx = tensors[f"{prefix}.scales"].astype(np.float64), tensors[f"{prefix}.g_idx"].astype(np.int64)
        n_in, n_out = g_idx.shape[0], scales.shape[1]
        q = unpack_along_first(qweight, bits, n_in)                       # [in, out]
        zeros = unpack_along_first(qzeros.T, bits, n_out).T + zero_offset          # [groups, out]
        w = scales[g_idx] * (q - zeros[g_idx])                            # [in, out]
        weights[prefix] = w.T
    floats = {k: v for k, v in tensors.items()
              if not k.endswith((".qweight", ".qzeros", ".scales", ".g_idx"))}
    return qcfg, weights, floats

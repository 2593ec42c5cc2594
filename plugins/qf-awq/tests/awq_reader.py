"""An independent reader of AutoAWQ GEMM checkpoints, written from the published layout
(AutoAWQ's ``WQLinear_GEMM.from_linear`` packing), for the tests. It shares no code with qf:
tensors are read with the ``safetensors`` library and every nibble is pulled out with an
explicit shift, in a loop over AWQ's order map.

``qweight`` ``[in, out/8]``: ``qweight[i, j] |= q[i, 8j + order[k]] << 4k`` for ``k = 0..7`` with
``order = [0, 2, 4, 6, 1, 3, 5, 7]``; ``qzeros`` ``[in/g, out/8]`` the same with the zero points;
``scales`` ``[in/g, out]``; ``W[o, i] = scales[i//g, o] · (q[i, o] − zeros[i//g, o])``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def unpack(words: np.ndarray) -> np.ndarray:
    u = words.astype(np.int64) & 0xFFFFFFFF
    n, w = u.shape
    out = np.zeros((n, w * 8), dtype=np.int64)
    for j in range(w):
        for k in range(8):
            out[:, 8 * j + ORDER[k]] = (u[:, j] >> (4 * k)) & 0xF
    return out


def read_awq(folder: Path) -> tuple[dict, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(quantization_config, dequantized weights [out, in] float64 by module, float tensors)``."""
    folder = Path(folder)
    qcfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "awq" and qcfg["version"] == "gemm" and qcfg["bits"] == 4
    g = qcfg["group_size"]
    tensors = {}
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    for f in files:
        for k, t in load_file(str(folder / f)).items():
            tensors[k] = t.numpy() if not t.is_floating_point() else t.double().numpy()
    weights = {}
    for key in [k for k in tensors if k.endswith(".qweight")]:
        prefix = key.removesuffix(".qweight")
        q = unpack(tensors[f"{prefix}.qweight"])            # [in, out]
        z = unpack(tensors[f"{prefix}.qzeros"])             # [groups, out]
        s = tensors[f"{prefix}.scales"].astype(np.float64)  # [groups, out]
        gi = np.arange(q.shape[0]) // g
        weights[prefix] = (s[gi] * (q - z[gi])).T
    floats = {k: v for k, v in tensors.items() if not k.endswith((".qweight", ".qzeros", ".scales"))}
    return qcfg, weights, floats

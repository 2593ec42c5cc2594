"""Run in GPTQModel's own virtualenv: load a GPTQ checkpoint folder with ``GPTQModel.load``
(CPU) and save every quantized linear's dequantized weight ``[out, in]`` (its own
``dequantize_weight``, in the model's dtype, as float32) to a ``torch.save`` file.

    GPTQMODEL_CPU_WORKERS=2 /work/venvs/gptqmodel-try/bin/python benchmarks/peers/gptqmodel_dequant.py FOLDER OUT.pt
"""

import sys

import torch
from gptqmodel import GPTQModel

model = GPTQModel.load(sys.argv[1], device="cpu")
out, kernels = {}, set()
for name, mod in model.model.named_modules():
    if hasattr(mod, "qweight") and hasattr(mod, "dequantize_weight"):
        kernels.add(type(mod).__name__)
        w = mod.dequantize_weight()
        out[name] = (w.T if w.shape[0] == mod.in_features else w).float().contiguous()
torch.save({"weights": out, "dtype": str(model.model.dtype), "kernel": ",".join(sorted(kernels))}, sys.argv[2])

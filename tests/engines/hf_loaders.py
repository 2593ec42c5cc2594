"""Run in the GPTQModel virtualenv (``.ci/gptqmodel-env.sh``), never imports quantfoundry: load a
GPTQ/AWQ checkpoint folder the way a user does and save what it computes.

    python hf_loaders.py gptqmodel|transformers FOLDER IDS.pt OUT.pt

Saves ``{"dtype", "kernels", "weights": {linear: W [out, in] float32}, "logits": float32}``:
each quantized linear's weight as the loader decodes it (its modules' ``dequantize_weight``;
for AWQ, whose CPU kernel repacks the codes for torch's int4 matmul, GPTQModel's
``dequantize_gemm`` on the checkpoint's tensors; ``decoded`` says which) and the logits its
default kernel computes for the token ids in ``IDS.pt``.
"""

import sys

import torch

loader, folder, ids_file, out_file = sys.argv[1:5]
dtype = torch.float16  # the GPTQ/AWQ torch kernels' dtype; float32 picks a CPU kernel that drops zero points
if loader == "gptqmodel":
    from gptqmodel import GPTQModel

    model = GPTQModel.load(folder, device="cpu", dtype=dtype).model
else:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=dtype)
model.eval()


def awq_weight(name: str) -> torch.Tensor:
    """GPTQModel's own AWQ (GEMM layout) decoding of the checkpoint's tensors of linear ``name``."""
    import json
    from pathlib import Path

    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm
    from safetensors import safe_open

    cfg = json.loads((Path(folder) / "config.json").read_text())["quantization_config"]
    parts = {}
    for file in Path(folder).glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for part in ("qweight", "qzeros", "scales"):
                if f"{name}.{part}" in f.keys():
                    parts[part] = f.get_tensor(f"{name}.{part}")
    w = dequantize_gemm(parts["qweight"], parts["qzeros"], parts["scales"], cfg["bits"], cfg["group_size"])
    return w.to(dtype).T  # [in, out] -> [out, in]

weights, kernels, decoded = {}, set(), {}
with torch.no_grad():
    for name, mod in model.named_modules():
        if hasattr(mod, "qweight"):
            kernels.add(type(mod).__name__)
            if hasattr(mod, "dequantize_weight"):  # the loader's own decoding of qweight/qzeros/scales
                w = mod.dequantize_weight()
                w = w.T if w.shape[0] == mod.in_features else w
                decoded[name] = "dequantize_weight"
            else:  # AWQ's CPU kernel repacks for torch's int4 matmul: GPTQModel's AWQ decoder, on the files
                w = awq_weight(name)
                decoded[name] = "dequantize_gemm"
            weights[name] = w.float().contiguous()
    logits = model(input_ids=torch.load(ids_file)).logits.float()
torch.save({"dtype": str(dtype), "kernels": sorted(kernels), "weights": weights, "decoded": decoded,
            "logits": logits}, out_file)

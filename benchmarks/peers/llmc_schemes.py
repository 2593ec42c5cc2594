"""Issue 19: llm-compressor's own compressed-tensors artifacts of each scheme on pycode-7m (bf16),
run in the peer environment (``benchmarks/peers/setup_llmc.sh``; llmcompressor 0.14.0.1,
compressed-tensors 0.19.0), printing each ``quantization_config`` and the layer-0 tensor table.
The layouts are kept as fixtures in ``plugins/qf-compressed-tensors/tests/fixtures/`` and our
exporter's artifacts are compared with them (config keys, tensor names, dtypes, shapes).

    python benchmarks/peers/llmc_schemes.py SCHEME OUT_ROOT
      SCHEME: w8a8_dyn w8a8_static w8a8_static_kv fp8_dyn fp8_static_kv w4a16 w4a16_asym w8a16 w4a16_frozen

``KV_SHIM=1``: llmcompressor 0.14.0.1 finds attention modules to calibrate the KV cache by a
``past_key_value(s)`` argument, which transformers 5.25 renamed ``cache``: the shim renames it
back for Llama (without it the kv_cache_scheme is silently dropped).
"""
import json
import os
import sys

import torch

os.environ["CUDA_VISIBLE_DEVICES"] = ""
import transformers.models.llama.modeling_llama as ml
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

_orig = ml.LlamaAttention.forward


def _fwd(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kw):
    kw.pop("cache", None)
    return _orig(self, hidden_states, position_embeddings, attention_mask, cache=past_key_values, **kw)
if os.environ.get("KV_SHIM"):
    ml.LlamaAttention.forward = _fwd
M = os.path.join(os.path.dirname(__file__), "..", "..", "core", "quantfoundry", "data", "pycode-7m")
name = sys.argv[1]
out = os.path.join(sys.argv[2], f"out_{name}")
torch.manual_seed(0)
ids = torch.randint(3, 4096, (8, 64))
ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
fp8kv = QuantizationArgs(num_bits=8, type="float", strategy="tensor", dynamic=False, symmetric=True)
if name == "w8a8_dyn":
    mod = QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])
elif name == "w8a8_static":
    mod = QuantizationModifier(ignore=["lm_head"], config_groups={"group_0": QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel"),
        input_activations=QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="tensor", dynamic=False))})
elif name == "fp8_dyn":
    mod = QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"])
elif name == "fp8_static_kv":
    mod = QuantizationModifier(targets="Linear", scheme="FP8", ignore=["lm_head"], kv_cache_scheme=fp8kv)
elif name == "w4a16":
    mod = QuantizationModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])
elif name == "w4a16_asym":
    mod = QuantizationModifier(targets="Linear", scheme="W4A16_ASYM", ignore=["lm_head"])
elif name == "w8a8_static_kv":
    mod = QuantizationModifier(ignore=["lm_head"], kv_cache_scheme=QuantizationArgs(num_bits=8, type="int", strategy="tensor", dynamic=False, symmetric=True), config_groups={"group_0": QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel"),
        input_activations=QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="tensor", dynamic=False))})
elif name == "w8a16":
    mod = QuantizationModifier(targets="Linear", scheme="W8A16", ignore=["lm_head"])
elif name == "w4a16_frozen":
    mod = QuantizationModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])
model = AutoModelForCausalLM.from_pretrained(M, dtype=torch.bfloat16)
tok = AutoTokenizer.from_pretrained(M)
oneshot(model=model, processor=tok, dataset=ds, recipe=[mod], num_calibration_samples=8,
        max_seq_length=64, shuffle_calibration_samples=False, batch_size=1)
model.save_pretrained(out, save_compressed=(name != "w4a16_frozen"))
cfg = json.load(open(f"{out}/config.json"))
print("=== quantization_config ===")
print(json.dumps(cfg["quantization_config"], indent=2))
print("=== tensors (layer 0 + others) ===")
with safe_open(f"{out}/model.safetensors", "pt") as f:
    for k in sorted(f.keys()):
        if "layers.0." in k or "layers" not in k:
            t = f.get_tensor(k)
            extra = ""
            if t.numel() <= 4:
                extra = f" value={t.float().tolist() if t.is_floating_point() else t.tolist()}"
            print(f"{k}: {t.dtype} {tuple(t.shape)}{extra}")

"""``qf run --target ENGINE``: the exporter, format and quantizer an engine reads best, with why.

The routing: CPU and Mac inference (llama.cpp, Ollama) → GGUF Q4_K_M (Q5_K_M for quality);
NVIDIA serving (vLLM, TGI, transformers) → GPTQ int4-g128, symmetric and without act-order,
the layout vLLM's Marlin kernels read (FP8 on Hopper as the alternative); fine-tuning (QLoRA) →
bitsandbytes NF4 with double quantization. Every choice can be overridden by its own flag.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError


@dataclass(frozen=True)
class Target:
    name: str
    exporter: str
    format: str
    quantizer: str
    why: str


_GPTQ_WHY = ("GPTQ int4-g128, symmetric, no act-order: the layout vLLM's Marlin kernels (and TGI's) read "
             "fastest, at a quarter of the 16-bit memory; on Hopper, FP8 keeps more quality at half the memory "
             "(--exporter compressed-tensors --format fp8-e4m3 --activations fp8)")

TARGETS: dict[str, Target] = {
    "llama.cpp": Target("llama.cpp", "gguf", "Q4_K_M", "rtn",
                        "CPU/Mac inference: llama.cpp's Q4_K_M, the usual balance of size and quality (--format "
                        "Q5_K_M for quality; --imatrix or --quantizer gptq lowers the loss further)"),
    "ollama": Target("ollama", "gguf", "Q4_K_M", "rtn",
                     "Ollama runs GGUF: Q4_K_M, its default kind (--format Q5_K_M for quality); a Modelfile with "
                     "the chat template and stop tokens is written beside model.gguf"),
    "vllm": Target("vllm", "hf-gptq", "int4-g128-sym", "gptq", f"NVIDIA serving with vLLM: {_GPTQ_WHY}"),
    "tgi": Target("tgi", "hf-gptq", "int4-g128-sym", "gptq", f"NVIDIA serving with TGI: {_GPTQ_WHY}"),
    "transformers": Target("transformers", "hf-gptq", "int4-g128-sym", "gptq",
                           "transformers serving on NVIDIA GPUs: a GPTQ checkpoint, read through gptqmodel and "
                           "optimum (pip install gptqmodel optimum)"),
    "qlora": Target("qlora", "bnb-4bit", "nf4-dq", "rtn",
                    "fine-tuning with QLoRA: bitsandbytes NF4 with double quantization "
                    "(bnb_4bit_use_double_quant), what transformers + peft load for training adapters"),
}


def target(name: str) -> Target:
    key = name.strip().lower()
    if key in ("llamacpp", "llama-cpp"):
        key = "llama.cpp"
    if key not in TARGETS:
        raise UsageError(f"--target {name!r}: choose one of {', '.join(TARGETS)}")
    return TARGETS[key]

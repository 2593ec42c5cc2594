"""Built-in architecture maps: Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3 (text)."""

from __future__ import annotations

from ..hookspecs import hookimpl
from ..roles.architecture import Architecture, InputGroup

_GQA = "v_proj and o_proj fold only per KV head: a scale must repeat across the query heads of a group"

# Llama-style block: pre-norm attention and SwiGLU MLP.
_LLAMA_GROUPS = (
    InputGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm", "norm"),
    InputGroup(("self_attn.o_proj",), "self_attn.v_proj", "linear", fold_note=_GQA),
    InputGroup(("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm", "norm"),
    InputGroup(("mlp.down_proj",), "mlp.up_proj", "linear"),
)

# Gemma 2/3: extra post-norms; the MLP input comes from pre_feedforward_layernorm.
_GEMMA2_GROUPS = (
    _LLAMA_GROUPS[0],
    _LLAMA_GROUPS[1],
    InputGroup(("mlp.gate_proj", "mlp.up_proj"), "pre_feedforward_layernorm", "norm"),
    _LLAMA_GROUPS[3],
)

BUILTIN_ARCHITECTURES = (
    Architecture("llama", ("LlamaForCausalLM",), _LLAMA_GROUPS, description="Llama 1/2/3, SmolLM, TinyLlama"),
    Architecture("mistral", ("MistralForCausalLM",), _LLAMA_GROUPS, description="Mistral 7B and derivatives"),
    Architecture("qwen2", ("Qwen2ForCausalLM",), _LLAMA_GROUPS, description="Qwen2 / Qwen2.5 (q/k/v biases)"),
    Architecture("qwen3", ("Qwen3ForCausalLM",), _LLAMA_GROUPS,
                 description="Qwen3 dense (q_norm/k_norm after q/k: fold only on the input side)"),
    Architecture("gemma", ("GemmaForCausalLM",), _LLAMA_GROUPS, norm_weight_offset=1.0,
                 description="Gemma 1 (RMSNorm computes x * (1 + w))"),
    Architecture("gemma2", ("Gemma2ForCausalLM",), _GEMMA2_GROUPS, norm_weight_offset=1.0,
                 description="Gemma 2 (pre/post feed-forward norms)"),
    Architecture("gemma3", ("Gemma3ForCausalLM",), _GEMMA2_GROUPS, norm_weight_offset=1.0,
                 description="Gemma 3 text models (q_norm/k_norm, pre/post feed-forward norms)"),
)


@hookimpl
def qf_register_architectures(register):
    for arch in BUILTIN_ARCHITECTURES:
        register(arch)

"""Built-in architecture maps: Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3 (text), and
the mixtures of experts Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and DeepSeek-V2/V3."""

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


def _moe_groups(moe: str, names: tuple[str, str, str], *, shared: str | None = None,
                shared_gate: str | None = None, dense: bool = False) -> tuple[InputGroup, ...]:
    """Attention as Llama's; the routed experts (and a shared expert) read the post-attention
    norm together with the router, which stays float (a folded scale goes into its columns);
    each expert's down projection reads its own up projection. ``dense``: some layers of the
    model have a plain MLP instead (Qwen's ``mlp_only_layers``)."""
    gate, up, down = names
    first = [f"{moe}.experts.*.{gate}", f"{moe}.experts.*.{up}"]
    readers = [f"{moe}.gate"]
    if shared is not None:
        first += [f"{moe}.{shared}.gate_proj", f"{moe}.{shared}.up_proj"]
    if shared_gate is not None:
        readers.append(f"{moe}.{shared_gate}")
    groups = [*_LLAMA_GROUPS[:2],
              InputGroup(tuple(first), "post_attention_layernorm", "norm", readers=tuple(readers)),
              InputGroup((f"{moe}.experts.*.{down}",), f"{moe}.experts.*.{up}", "linear")]
    if shared is not None:
        groups.append(InputGroup((f"{moe}.{shared}.down_proj",), f"{moe}.{shared}.up_proj", "linear"))
    if dense:
        groups += _LLAMA_GROUPS[2:]
    return tuple(groups)


_EXPERT = ("gate_proj", "up_proj", "down_proj")

# DeepSeek-V2/V3: multi-head latent attention (queries through a low-rank q_a → norm → q_b, or
# one q_proj in V2-Lite; keys and values through kv_a → norm → kv_b), routed experts with shared
# ones, and the first first_k_dense_replace layers with a plain MLP
_DEEPSEEK_GROUPS = (
    InputGroup(("self_attn.q_proj", "self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"), "input_layernorm", "norm"),
    InputGroup(("self_attn.q_b_proj",), "self_attn.q_a_layernorm", "norm"),
    InputGroup(("self_attn.kv_b_proj",), "self_attn.kv_a_layernorm", "norm"),
    InputGroup(("self_attn.o_proj",), None, "none"),  # reads the heads' values out of kv_b: no fold
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
    Architecture("mixtral", ("MixtralForCausalLM",), _moe_groups("block_sparse_moe", ("w1", "w3", "w2")),
                 expert_linears=("w1", "w3", "w2"), module_aliases=(("block_sparse_moe", "mlp"),),
                 description="Mixtral 8x7B/8x22B (mixture of experts: w1/w3/w2 per expert)"),
    Architecture("qwen2_moe", ("Qwen2MoeForCausalLM",),
                 _moe_groups("mlp", _EXPERT, shared="shared_expert", shared_gate="shared_expert_gate", dense=True),
                 description="Qwen1.5-MoE / Qwen2-MoE (routed experts, a gated shared expert)"),
    Architecture("qwen3_moe", ("Qwen3MoeForCausalLM",), _moe_groups("mlp", _EXPERT, dense=True),
                 description="Qwen3-MoE (30B-A3B, 235B-A22B: routed experts, q_norm/k_norm)"),
    Architecture("olmoe", ("OlmoeForCausalLM",), _moe_groups("mlp", _EXPERT),
                 description="OLMoE (64 experts, 8 per token; q_norm/k_norm over all heads)"),
    Architecture("deepseek_v2", ("DeepseekV2ForCausalLM",),
                 _DEEPSEEK_GROUPS + _moe_groups("mlp", _EXPERT, shared="shared_experts", dense=True)[2:],
                 description="DeepSeek-V2 / V2-Lite (latent attention, routed and shared experts)"),
    Architecture("deepseek_v3", ("DeepseekV3ForCausalLM",),
                 _DEEPSEEK_GROUPS + _moe_groups("mlp", _EXPERT, shared="shared_experts", dense=True)[2:],
                 description="DeepSeek-V3 / R1, Kimi K2 (latent attention, sigmoid router with score bias)"),
)


@hookimpl
def qf_register_architectures(register):
    for arch in BUILTIN_ARCHITECTURES:
        register(arch)

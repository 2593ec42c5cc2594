"""Tiny config-built models of every built-in architecture, written as real HF folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from ..data import default_model_path

#: the ``model_type`` and class of every built-in architecture, with tiny shapes
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {"model_type": "llama", "architectures": ["LlamaForCausalLM"]},
    "mistral": {"model_type": "mistral", "architectures": ["MistralForCausalLM"]},
    "qwen2": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]},
    "qwen3": {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]},
    # Gemma checkpoints tie the output to the embedding, and llama.cpp's Gemma graphs assume it
    "gemma": {"model_type": "gemma", "architectures": ["GemmaForCausalLM"], "tie_word_embeddings": True},
    "gemma2": {"model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"], "tie_word_embeddings": True},
    "gemma3": {"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], "tie_word_embeddings": True},
    # mixtures of experts: 4 experts, 2 per token (the real models: 8/2, 60/4, 128/8, 64/8)
    "mixtral": {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "num_local_experts": 4,
                "num_experts_per_tok": 2},
    "qwen2_moe": {"model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"], "num_experts": 4,
                  "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64,
                  "norm_topk_prob": False},
    "qwen3_moe": {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "num_experts": 4,
                  "num_experts_per_tok": 2, "moe_intermediate_size": 64, "norm_topk_prob": True},
    "olmoe": {"model_type": "olmoe", "architectures": ["OlmoeForCausalLM"], "num_experts": 4,
              "num_experts_per_tok": 2},
    # layer 0 dense (first_k_dense_replace), layer 1 MoE with a shared expert; latent attention
    # with a low-rank query (V3) or one q_proj (V2-Lite)
    "deepseek_v3": {"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "n_routed_experts": 4,
                    "num_experts_per_tok": 2, "n_shared_experts": 1, "moe_intermediate_size": 32,
                    "first_k_dense_replace": 1, "n_group": 2, "topk_group": 1, "q_lora_rank": 32,
                    "kv_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16,
                    "num_key_value_heads": 4, "head_dim": 8},
    "deepseek_v2": {"model_type": "deepseek_v2", "architectures": ["DeepseekV2ForCausalLM"], "n_routed_experts": 4,
                    "num_experts_per_tok": 2, "n_shared_experts": 1, "moe_intermediate_size": 32,
                    "first_k_dense_replace": 1, "q_lora_rank": None, "kv_lora_rank": 32, "qk_rope_head_dim": 8,
                    "qk_nope_head_dim": 16, "v_head_dim": 16, "num_key_value_heads": 4, "head_dim": 8,
                    "topk_method": "greedy"},
}
#: the architectures of :data:`TINY_CONFIGS` that are mixtures of experts
MOE_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")
#: the dense ones
DENSE_ARCHS = tuple(a for a in TINY_CONFIGS if a not in MOE_ARCHS)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


def tiny_config(arch: str = "llama", **overrides: Any) -> Any:
    """A tiny transformers config of ``arch`` (vocab 4096: the embedded tokenizer's)."""
    from transformers import AutoConfig

    base = dict(TINY_CONFIGS[arch])
    model_type = base.pop("model_type")
    fields: dict[str, Any] = dict(
        vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=None,
    )
    fields.update(base)
    fields.update(overrides)
    if model_type.startswith("deepseek"):  # latent attention: one KV head per query head, rope of qk_rope_head_dim
        fields["num_key_value_heads"] = fields["num_attention_heads"]
        fields["head_dim"] = fields["qk_rope_head_dim"]
    if model_type in ("gemma2", "gemma3_text"):
        # as in Gemma 2 2B/9B and Gemma 3 (not 27B): queries scaled by 1/sqrt(head_dim), which
        # llama.cpp assumes for every size but 27B's
        fields.setdefault("query_pre_attn_scalar", fields["head_dim"])
    return AutoConfig.for_model(model_type, **fields)


def build_tiny_model(folder: Path, arch: str = "llama", *, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                     **overrides: Any) -> Path:
    """Write a randomly initialized tiny ``arch`` model (safetensors) with the embedded tokenizer."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = tiny_config(arch, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.05)
            elif "norm" in name:
                p.uniform_(0.5, 1.5) if "gemma" not in arch else p.uniform_(-0.5, 0.5)
            else:
                p.normal_(0.0, 0.02)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek-V3's stored router bias: one that reroutes
                b.normal_(0.0, 0.5)
    model.to(dtype).save_pretrained(folder, safe_serialization=True)
    src = default_model_path()
    for name in _TOKENIZER_FILES:
        shutil.copy2(src / name, folder / name)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.setdefault("architectures", TINY_CONFIGS[arch]["architectures"])
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder


#: the decoder-block linears of the Llama-style tiny models
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def first_block(folder: Path, spec: str, *, n: int = 4, seq: int = 48, seed: int = 0) -> Any:
    """The first decoder block of the model at ``folder`` (loaded in float32) as a
    :class:`quantfoundry.Block` planning every linear of :data:`LINEARS` onto ``spec``, with
    ``n`` random sequences of ``seq`` tokens (ids from ``seed``) as its calibration inputs — what
    a block quantizer's tests run it on."""
    from transformers import AutoModelForCausalLM

    import quantfoundry as qf

    from ..model.capture import capture_inputs

    source = qf.resolve_model(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ids = torch.randint(0, 4096, (n, seq), generator=torch.Generator().manual_seed(seed))
    layers = model.model.layers
    inputs, kwargs = capture_inputs(model, layers, model.model.norm, list(ids.split(2)))
    fmt = qf.resolve_format(spec)
    return qf.Block(0, "model.layers.0", layers[0], source.architecture, {name: fmt for name in LINEARS},
                    qf.BlockInputs(inputs.hidden, kwargs[0]))


def inputs_of(block: Any, name: str) -> torch.Tensor:
    """Every calibration input of the linear ``name`` as the block runs now (float64 rows)."""
    xs: list[torch.Tensor] = []
    with block.capture_inputs([name], lambda _n, x: xs.append(x.reshape(-1, x.shape[-1]).double())):
        block.run()
    return torch.cat(xs)

"""``qf plan``: parameters, active parameters, KV cache and weight bytes from a config alone,
against figures counted by hand from each model's published architecture (Llama-3-8B/70B,
Mixtral-8x7B, Qwen3-30B-A3B, Gemma-3-27B's text model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from quantfoundry.deploy.vram import GiB, gpu_bytes, model_shape, plan_memory
from quantfoundry.errors import UsageError

LLAMA3_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
             "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
             "max_position_embeddings": 8192}
LLAMA3_70B = {**LLAMA3_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
              "num_attention_heads": 64}
MIXTRAL = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096,
           "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
           "vocab_size": 32000, "num_local_experts": 8, "num_experts_per_tok": 2, "sliding_window": None,
           "rms_norm_eps": 1e-5, "rope_theta": 1e6, "tie_word_embeddings": False}
QWEN3_MOE = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
             "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
             "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936,
             "num_experts": 128, "num_experts_per_tok": 8, "decoder_sparse_step": 1, "mlp_only_layers": [],
             "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "use_sliding_window": False}
GEMMA3_27B = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": 5376,
              "intermediate_size": 21504, "num_hidden_layers": 62, "num_attention_heads": 32,
              "num_key_value_heads": 16, "head_dim": 128, "vocab_size": 262208, "sliding_window": 1024,
              "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(62)],
              "tie_word_embeddings": True, "rms_norm_eps": 1e-6, "query_pre_attn_scalar": 168}


def _write(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return path


def _dense(h: int, i: int, layers: int, heads: int, kv: int, hd: int, vocab: int, tied: bool, qk_norm: bool = False,
           norms_per_layer: int = 2) -> int:
    per_layer = h * heads * hd + 2 * h * kv * hd + heads * hd * h + 3 * h * i + norms_per_layer * h \
        + (2 * hd if qk_norm else 0)
    return vocab * h * (1 if tied else 2) + layers * per_layer + h


@pytest.mark.parametrize(("cfg", "params", "active", "kv_token"), [
    # Llama-3-8B: 8.03B; KV 32 layers x 8 heads x 128 x (K, V) x 2 bytes = 128 KiB per token
    (LLAMA3_8B, _dense(4096, 14336, 32, 32, 8, 128, 128256, False), None, 32 * 8 * 128 * 2 * 2),
    (LLAMA3_70B, _dense(8192, 28672, 80, 64, 8, 128, 128256, False), None, 80 * 8 * 128 * 2 * 2),
])
def test_dense_models_by_hand(tmp_path, cfg, params, active, kv_token):
    shape = model_shape(_write(tmp_path, cfg))
    assert shape.parameters == params
    assert shape.active_parameters == params
    assert shape.kv_bytes_per_token("fp16") == kv_token
    assert 8.03e9 < shape.parameters < 8.04e9 or 70.5e9 < shape.parameters < 70.6e9


def test_mixtral_counts_every_expert_and_shows_the_active_ones(tmp_path):
    h, i, e = 4096, 14336, 8
    attn = h * 4096 * 2 + 2 * h * 1024
    experts = e * 3 * h * i
    per_layer = attn + experts + e * h + 2 * h  # router, two norms
    total = 2 * 32000 * h + 32 * per_layer + h
    shape = model_shape(_write(tmp_path, MIXTRAL))
    assert shape.parameters == total  # 46.7B
    assert shape.active_parameters == total - 32 * experts + 32 * 2 * 3 * h * i  # 12.9B: 2 experts of 8
    assert round(shape.parameters / 1e9, 1) == 46.7 and round(shape.active_parameters / 1e9, 1) == 12.9
    assert shape.kv_bytes_per_token("fp16") == 32 * 8 * 128 * 2 * 2


def test_qwen3_moe_by_hand(tmp_path):
    h, e, mi = 2048, 128, 768
    attn = h * 32 * 128 + 2 * h * 4 * 128 + 32 * 128 * h + 2 * 128  # q, k, v, o, q/k norms
    experts = e * 3 * h * mi
    per_layer = attn + experts + e * h + 2 * h
    total = 2 * 151936 * h + 48 * per_layer + h
    shape = model_shape(_write(tmp_path, QWEN3_MOE))
    assert shape.parameters == total and round(total / 1e9, 1) == 30.5
    assert shape.active_parameters == total - 48 * experts + 48 * 8 * 3 * h * mi
    assert round(shape.active_parameters / 1e9, 2) == 3.35  # "3.3B activated", the embeddings counted
    assert shape.kv_bytes_per_token("fp8") == 48 * 4 * 128 * 2 * 1


def test_gemma3_sliding_layers_keep_their_window(tmp_path):
    shape = model_shape(_write(tmp_path, GEMMA3_27B))
    assert shape.parameters == _dense(5376, 21504, 62, 32, 16, 128, 262208, True, qk_norm=True, norms_per_layer=4)
    full, sliding = 62 // 6, 62 - 62 // 6  # 10 global layers, 52 with a 1024-token window
    per_layer = 2 * 16 * 128 * 2
    assert shape.kv_bytes_per_token("fp16", 32768) == pytest.approx(per_layer * (full + sliding * 1024 / 32768))
    assert shape.kv_bytes_per_token("fp16", 512) == pytest.approx(per_layer * 62)  # shorter than the window
    plan = plan_memory(_write(tmp_path, GEMMA3_27B), context=32768, batch=2, formats=["bf16"])
    assert plan.rows[0].kv_cache == int(shape.kv_bytes_per_token("fp16", 32768) * 32768 * 2)


def test_weight_bytes_per_format_by_hand(tmp_path):
    """Q8_0: 34 bytes per 32 weights for every 2-D tensor (llama.cpp's Q8_0 file type quantizes the
    embedding and output too); int8 per channel: one byte per weight plus a float16 scale per row,
    on the block linears only; bf16: two bytes each."""
    path = _write(tmp_path, LLAMA3_8B)
    shape = model_shape(path)
    two_d = sum(t.numel for t in shape.tensors if len(t.shape) == 2)
    one_d = shape.parameters - two_d
    plan = plan_memory(path, formats=["bf16", "Q8_0", "int8-sym"])
    rows = {r.label: r for r in plan.rows}
    assert rows["bf16"].weights == 2 * shape.parameters
    assert rows["Q8_0"].weights == two_d * 34 // 32 + 2 * one_d
    linears = [t for t in shape.tensors if t.kind == "linear"]
    assert len(linears) == 32 * 7
    lin = sum(t.numel for t in linears)
    rows_out = sum(t.shape[0] for t in linears)
    assert rows["int8-sym"].weights == lin + 2 * rows_out + 2 * (shape.parameters - lin)
    # llama.cpp's Q4_K_M of Llama-3-8B is 4.58 GiB (4.92 GB): the mix rules, not one type
    q4 = plan_memory(path, formats=["Q4_K_M"]).rows[0].weights
    assert 4.55 * GiB < q4 < 4.60 * GiB


def test_which_gpus_fit(tmp_path):
    path = _write(tmp_path, LLAMA3_70B)
    plan = plan_memory(path, context=8192, batch=1, formats=["bf16", "Q4_K_M"], gpus=["H100", "RTX4090"])
    bf16, q4 = plan.rows
    assert plan.gpus_needed(bf16, gpu_bytes("H100")[1]) == 2  # 131 GiB of weights
    assert plan.gpus_needed(q4, gpu_bytes("H100")[1]) == 1    # 39.6 GiB
    # 39.6 GiB of weights, 2.5 GiB of KV cache, 1.4 GiB of activations: 43.4 GiB over cards of 24 GiB
    # filled to 90% less 1 GiB of runtime each (20.6 GiB): three RTX 4090s
    rtx = gpu_bytes("RTX4090")[1]
    need = (q4.weights + q4.kv_cache + q4.activations) / (0.9 * rtx - q4.runtime)
    assert 2 < need < 3 and plan.gpus_needed(q4, rtx) == 3
    j = plan.to_json()
    assert j["formats"][1]["gpus_needed"] == {"H100": 1, "RTX4090": 3} and "70B" in j["advice"]


def test_sizes_and_names_of_gpus():
    assert gpu_bytes("24GB") == ("24 GiB", 24 * GiB)
    assert gpu_bytes("h100")[0] == "H100"
    with pytest.raises(UsageError, match="name a GPU"):
        gpu_bytes("Voodoo2")


def test_the_cli_prints_the_table_and_the_moe_trap(tmp_path):
    from click.testing import CliRunner
    from quantfoundry.cli import cli

    res = CliRunner().invoke(cli, ["plan", "--model", str(_write(tmp_path, MIXTRAL)), "--context", "32768",
                                   "--batch", "8", "--gpu", "H100", "--format", "Q4_K_M", "--format", "int4-g128"])
    assert res.exit_code == 0, res.output
    assert "46.70B parameters in memory" in res.output and "12.88B active" in res.output
    assert "compute, not memory" in res.output and "Q4_K_M" in res.output and "advice" in res.output
    res = CliRunner().invoke(cli, ["plan", "--model", str(tmp_path / "missing"), "--format", "bf16"])
    assert res.exit_code != 0 and "does not exist" in res.output

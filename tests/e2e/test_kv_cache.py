"""The FP8 KV cache: scales calibrated on the keys after RoPE and on the values, simulated inside
transformers' attention, stored in the artifact and simulated again on reload."""

from __future__ import annotations

import pytest
import quantfoundry as qf
import torch
from quantfoundry.errors import IncompatiblePlanError, UsageError
from quantfoundry.pipeline.components import make
from quantfoundry.pipeline.journal import BlockRecord, Journal
from quantfoundry.roles.kernel import QuantLinear

CAL = {"n_samples": 4, "seq_len": 48}


def test_layer0_scales_are_the_absmax_of_the_keys_after_rope_and_the_values(tiny_model, tmp_path) -> None:
    """Recomputed from the float model holding the artifact's layer-0 weights: k_proj's output
    rotated with transformers' own apply_rotary_pos_emb, max|k| / 448 and max|v| / 448."""
    from transformers import AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    folder = tiny_model("llama")
    out = tmp_path / "kv"
    qf.run(folder, format="int8-sym", kv_cache="fp8", calibrator_options=CAL, out=out, evaluators=[], progress=False)
    artifact = qf.load(out)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    for name, mod in artifact.named_modules():
        if isinstance(mod, QuantLinear) and name.startswith("model.layers.0."):
            model.get_submodule(name).weight.data = mod.qweight.dequantize()
    attn = model.model.layers[0].self_attn
    ids = make("calibrator", "text", CAL).load(qf.resolve_model(folder).tokenizer()).input_ids
    k_max = v_max = 0.0
    with torch.no_grad():
        for batch in ids.split(8):
            h = model.model.layers[0].input_layernorm(model.model.embed_tokens(batch))
            pos = torch.arange(batch.shape[1]).unsqueeze(0)
            cos, sin = model.model.rotary_emb(h, pos)
            shape = (*h.shape[:-1], -1, attn.head_dim)
            q = attn.q_proj(h).view(shape).transpose(1, 2)
            k = attn.k_proj(h).view(shape).transpose(1, 2)
            _, k = apply_rotary_pos_emb(q, k, cos, sin)
            k_max = max(k_max, float(k.double().abs().max()))
            v_max = max(v_max, float(attn.v_proj(h).double().abs().max()))
    state = artifact.model.layers[0].self_attn._qf_kv
    assert float(state.k_scale) == pytest.approx(k_max / 448, rel=1e-5)
    assert float(state.v_scale) == pytest.approx(v_max / 448, rel=1e-5)
    assert state.k_scale.dtype == torch.float32


@pytest.mark.parametrize("exporter,fmt", [("qf", "int4-g32"), ("compressed-tensors", "fp8-e4m3")])
def test_the_reloaded_model_simulates_the_same_cache(tiny_model, tmp_path, exporter: str, fmt: str) -> None:
    folder = tiny_model("llama")
    kw = dict(format=fmt, calibrator_options=CAL, evaluators=[], progress=False, keep_model=True,
              exporter=exporter)
    run = qf.run(folder, kv_cache="fp8", out=tmp_path / "kv", **kw)
    plain = qf.run(folder, out=tmp_path / "plain", **kw)
    ids = torch.randint(0, 4000, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = run.model(input_ids=ids).logits
        b = qf.load(tmp_path / "kv")(input_ids=ids).logits
        c = plain.model(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)


def test_kv_cache_is_checked_before_any_work(tiny_model) -> None:
    folder = tiny_model("llama")
    with pytest.raises(UsageError, match="--kv-cache: unknown scheme 'int8'"):
        qf.run(folder, kv_cache="int8", out=None, evaluators=[], progress=False)
    with pytest.raises(IncompatiblePlanError, match="exporter 'hf-gptq' cannot store an fp8 KV cache"):
        qf.run(folder, kv_cache="fp8", exporter="hf-gptq", format="int4-g32", out=None, evaluators=[],
               progress=False)


def test_the_journal_keeps_block_extras(tmp_path) -> None:
    journal = Journal(tmp_path / "j", {"x": 1})
    journal.start(fresh=True)
    extras = {"model.layers.0.self_attn.k_scale": torch.tensor([0.25]),
              "model.layers.0.self_attn.v_scale": torch.tensor([0.5])}
    journal.write_block(0, BlockRecord([("a.weight", torch.ones(2))], ["note"], {}, extras))
    back = journal.read_block(0)
    assert set(back.extras) == set(extras)
    assert all(torch.equal(back.extras[k], v) for k, v in extras.items())


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma", "gemma2", "gemma3"])
def test_every_architecture_and_attention_implementation(tiny_model, tmp_path, arch: str) -> None:
    """sdpa and eager (Gemma 2's softcapped attention) both run through the wrapper; the artifact
    reproduces the in-memory model's KL exactly."""
    r = qf.run(tiny_model(arch), format="int8-sym", kv_cache="fp8", calibrator_options=CAL, out=tmp_path / "kv",
               evaluators=[("kl", {"max_tokens": 512})], progress=False, keep_model=True)
    assert r.model.config._attn_implementation.startswith("qf-kv-")
    kl = r.metrics["kl"]["kl_mean"]
    assert kl["quantized"] == kl["artifact"] > 0
    assert not [n for n in r.notes if "MISMATCH" in n]

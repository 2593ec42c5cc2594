"""The pipeline serves transform stages and whole-model quantizers with no special case."""

from __future__ import annotations

import quantfoundry as qf
import torch
from quantfoundry import QuantLinear
from safetensors.torch import load_file


class FoldScale(qf.Transform):
    """A transform stage in the AWQ/SmoothQuant mould: per input channel, divide the norm
    before q/k/v by s and multiply q/k/v's columns by s (the float model is unchanged)."""

    name = "fold-scale"

    def transform_block(self, block, ctx):
        group = block.architecture.groups[0]
        norm = block.module.get_submodule(group.prev)
        s = torch.linspace(0.5, 2.0, norm.weight.numel(), dtype=norm.weight.dtype)
        offset = block.architecture.norm_weight_offset
        norm.weight.data = (offset + norm.weight.data) / s - offset
        for name in group.linears:
            block.linear(name).weight.data *= s


class WholeModelRTN(qf.Quantizer):
    """A whole-model quantizer (the QAT shape): sees every linear of the model at once."""

    name = "whole-rtn"
    scope = "model"

    def quantize_model(self, model, plan, calibration, ctx):
        assert all(p.device.type != "meta" for p in model.parameters())
        return {name: e.format.quantize(model.get_submodule(name).weight) for name, e in plan.quantized().items()}


def _register(register_plugin) -> None:
    class P:
        @qf.hookimpl
        def qf_register_quantizers(self, register):
            register(FoldScale)
            register(WholeModelRTN)

    register_plugin(P(), "stage-kinds")


def test_transform_then_round(register_plugin, tiny_model, tmp_path) -> None:
    _register(register_plugin)
    folder = tiny_model("llama")
    out = tmp_path / "o"
    result = qf.run(str(folder), quantizer=[("fold-scale", {}), ("rtn", {})], format="int8",
                    out=out, keep_model=True, progress=False)
    src = load_file(str(folder / "model.safetensors"))
    written = load_file(str(out / "model.safetensors"))
    s = torch.linspace(0.5, 2.0, 64)
    norm = "model.layers.0.input_layernorm.weight"
    torch.testing.assert_close(written[norm].float(), (src[norm].float() / s).to(torch.bfloat16).float())
    q = result.model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(q, QuantLinear)
    ref = qf.resolve_format("int8").quantize(src["model.layers.0.self_attn.q_proj.weight"].float() * s)
    assert torch.equal(q.qweight.packed, ref.packed)
    # the float model is unchanged by the transform: quantized logits stay close to the original
    from transformers import AutoModelForCausalLM

    orig = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = torch.randint(0, 4096, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (result.model(input_ids=ids).logits - orig(input_ids=ids).logits).abs().max()
    assert diff < 0.05


def test_whole_model_quantizer(register_plugin, tiny_model, tmp_path) -> None:
    _register(register_plugin)
    folder = tiny_model("gemma2", tie_word_embeddings=True)
    out = tmp_path / "o"
    result = qf.run(str(folder), quantizer="whole-rtn", format="int4-g32", evaluators=["size"], out=out,
                    progress=False)
    assert result.metrics["size"]["linear_bpw"]["quantized"] == 4 + 24 / 32
    loaded = qf.load(out)
    rtn = qf.run(str(folder), format="int4-g32", out=None, keep_model=True, progress=False).model
    for name, mod in loaded.named_modules():
        if isinstance(mod, QuantLinear):
            assert torch.equal(mod.qweight.packed, rtn.get_submodule(name).qweight.packed)
    assert "lm_head.weight" not in load_file(str(out / "model.safetensors"))  # tied: stored once


def test_recipe_order_is_checked_before_any_work(register_plugin, tmp_path) -> None:
    """A transform last, or a rounding quantizer that offers no transform before another
    quantizer, is a one-line error naming the fix — before the model is read."""
    from quantfoundry.errors import UsageError

    _register(register_plugin)
    import pytest

    with pytest.raises(UsageError, match="the last stage 'fold-scale' only transforms; add a rounding quantizer"):
        qf.run(quantizer=[("rtn", {}), ("fold-scale", {})], model=str(tmp_path / "no-such-model"))
    with pytest.raises(UsageError, match="quantizer 'rtn' rounds weights and offers no transform"):
        qf.run(quantizer=[("rtn", {}), ("rtn", {})], model=str(tmp_path / "no-such-model"))

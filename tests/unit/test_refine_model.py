"""``Quantizer.refine_model``: the pipeline's end-to-end stage after the block loop — the whole
quantized model and the original beside it, the calibration ids, the returned weights swapped
in and written, block norms changed in place kept, and a weight outside the blocks refused."""

from __future__ import annotations

import pytest
import quantfoundry as qf
import torch
from quantfoundry import hookimpl
from quantfoundry.builtin.rtn import RTNQuantizer
from quantfoundry.errors import UsageError

DOWN = "model.layers.0.mlp.down_proj"


class Refiner(RTNQuantizer):
    """RTN, then a refinement that rounds ``DOWN`` again from half the original weight and
    doubles block 0's first norm (or, with ``outside``, returns the head)."""

    name = "test-refiner"
    needs_calibration = True
    seen: dict = {}  # noqa: RUF012 - the test reads what the call saw
    outside = False

    def refines_model(self) -> bool:
        return True

    def refine_model(self, model, reference, calibration, ctx):
        Refiner.seen = {"ids": tuple(calibration.shape), "quantized": type(model.get_submodule(DOWN)).__name__,
                        "reference": type(reference.get_submodule(DOWN)).__name__}
        if Refiner.outside:
            return {"lm_head": model.get_submodule(DOWN).qweight}
        model.get_submodule("model.layers.0.input_layernorm").weight.data.mul_(2)
        fmt = model.get_submodule(DOWN).format
        return {DOWN: fmt.quantize(reference.get_submodule(DOWN).weight.detach().float() * 0.5)}


class Plugin:
    @hookimpl
    def qf_register_quantizers(self, register):
        register(Refiner)


def test_refined_weights_and_norms_reach_the_artifact(tiny_model, tmp_path, register_plugin):
    register_plugin(Plugin(), "test-refiner-plugin")
    folder = tiny_model("llama")
    Refiner.outside = False
    r = qf.run(str(folder), quantizer="test-refiner", format="int8", out=str(tmp_path / "q"), evaluators=[],
               calibrator_options={"n_samples": 6, "seq_len": 32}, progress=False)
    assert Refiner.seen == {"ids": (6, 32), "quantized": "QuantLinear", "reference": "Linear"}
    assert "refine" in r.timings
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    loaded = qf.load(str(tmp_path / "q"))
    want = qf.resolve_format("int8").quantize(original.get_submodule(DOWN).weight.detach().float() * 0.5)
    assert torch.equal(loaded.get_submodule(DOWN).qweight.dequantize(), want.dequantize())
    norm = "model.layers.0.input_layernorm"
    assert torch.equal(loaded.get_submodule(norm).weight.float(), 2 * original.get_submodule(norm).weight)
    # another block's linear is RTN's, untouched by the refinement
    up = "model.layers.1.mlp.up_proj"
    assert torch.equal(loaded.get_submodule(up).qweight.dequantize(),
                       qf.resolve_format("int8").quantize(original.get_submodule(up).weight.detach().float()).dequantize())


def test_refining_outside_the_blocks_is_refused(tiny_model, tmp_path, register_plugin):
    register_plugin(Plugin(), "test-refiner-plugin")
    folder = tiny_model("llama")
    Refiner.outside = True
    with pytest.raises(UsageError, match="outside the decoder blocks"):
        qf.run(str(folder), quantizer="test-refiner", format="int8", out=str(tmp_path / "x"), evaluators=[],
               calibrator_options={"n_samples": 4, "seq_len": 32}, progress=False)
    assert not (tmp_path / "x").exists()

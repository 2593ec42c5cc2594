"""The block-streaming pipeline on config-built tiny models of every built-in architecture."""

from __future__ import annotations

import numpy as np
import pytest
import quantfoundry as qf
import torch
from quantfoundry import QuantLinear
from quantfoundry.testing.tiny import TINY_CONFIGS
from torch import nn


class _CaptureCheck(qf.Quantizer):
    """A block-scope quantizer for the test: records what the pipeline hands it."""

    name = "capture-check"
    scope = "block"
    needs_calibration = True
    records: list[dict] = []

    def quantize_block(self, block, ctx):
        outputs = block.run()  # float weights: the block's own forward on the captured inputs
        _CaptureCheck.records.append({
            "index": block.index, "inputs": [h.clone() for h in block.inputs.hidden],
            "kwargs": block.inputs.kwargs, "outputs": [o.clone() for o in outputs],
            "module": block.module,
        })
        return {n: f.quantize(block.linear(n).weight) for n, f in block.formats.items()}


@pytest.fixture
def capture_plugin(register_plugin):
    class P:
        @qf.hookimpl
        def qf_register_quantizers(self, register):
            register(_CaptureCheck)

    _CaptureCheck.records = []
    register_plugin(P(), "capture-check")
    return _CaptureCheck


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_captured_block_inputs_match_transformers(arch, tiny_model, capture_plugin, tmp_path) -> None:
    """Block 0's captured input is the model's embedding output, and every block run on the
    captured kwargs reproduces transformers' own layer output (float weights)."""
    from transformers import AutoModelForCausalLM

    folder = tiny_model(arch, num_hidden_layers=3)
    text = tmp_path / "calib.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 200)
    qf.run(str(folder), quantizer="capture-check", format="int8", calibrator="text",
           calibrator_options={"path": str(text), "n_samples": 3, "seq_len": 16}, batch_size=2,
           out=None, progress=False)
    records = capture_plugin.records
    assert [r["index"] for r in records] == [0, 1, 2]
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    from quantfoundry.builtin.text_calibrator import TextCalibrator, TextCalibratorOptions
    from transformers import AutoTokenizer

    cal = TextCalibrator(TextCalibratorOptions(path=text, n_samples=3, seq_len=16)).load(
        AutoTokenizer.from_pretrained(folder))
    with torch.no_grad():
        out = ref(input_ids=cal.input_ids, output_hidden_states=True)
    hs = out.hidden_states
    got0 = torch.cat(records[0]["inputs"])
    torch.testing.assert_close(got0, hs[0], rtol=0, atol=0)
    # block 0 run by the pipeline on its captured kwargs == transformers' layer-0 output
    torch.testing.assert_close(torch.cat(records[0]["outputs"]), hs[1], rtol=1e-5, atol=1e-5)
    # every later block, run in float on transformers' own input with the captured kwargs
    for r in records[1:-1]:
        i = r["index"]
        kwargs = r["kwargs"]
        outs = []
        layer = ref.get_submodule("model.layers")[i]
        start = 0
        for kw, h in zip(kwargs, r["inputs"], strict=True):
            n = h.shape[0]
            with torch.no_grad():
                o = layer(hs[i][start:start + n], **kw)
            outs.append(o[0] if isinstance(o, tuple) else o)
            start += n
        torch.testing.assert_close(torch.cat(outs), hs[i + 1], rtol=1e-5, atol=1e-5)


def test_rtn_weights_equal_the_format_applied_to_the_checkpoint(tiny_model, tmp_path) -> None:
    """RTN's in-memory model holds exactly fmt.quantize(checkpoint weight) for every linear;
    everything else is the checkpoint's float value."""
    from safetensors.torch import load_file

    folder = tiny_model("qwen2")
    result = qf.run(str(folder), format="int4-g32", out=tmp_path / "o", keep_model=True, progress=False)
    state = load_file(str(folder / "model.safetensors"))
    fmt = qf.resolve_format("int4-g32")
    n = 0
    for name, mod in result.model.named_modules():
        if isinstance(mod, QuantLinear):
            ref = fmt.quantize(state[f"{name}.weight"].float())
            assert torch.equal(mod.qweight.packed, ref.packed)
            assert all(torch.equal(mod.qweight.params[k], ref.params[k]) for k in ref.params)
            if mod.bias is not None:  # qwen2 q/k/v biases stay float
                torch.testing.assert_close(mod.bias.float(), state[f"{name}.bias"].float(), rtol=0, atol=0)
            n += 1
    assert n == 2 * 7
    assert isinstance(result.model.lm_head, nn.Linear)


def test_quantized_logits_follow_the_dequantized_weights(tiny_model, tmp_path) -> None:
    """The QuantLinear model equals a plain float model whose linears hold the dequantized
    weights (computed here from the codes in float64, independently of the kernel)."""
    from transformers import AutoModelForCausalLM

    folder = tiny_model("llama")
    result = qf.run(str(folder), format="int3-g32-sym", out=None, keep_model=True, progress=False)
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for name, mod in result.model.named_modules():
        if isinstance(mod, QuantLinear):
            qw = mod.qweight
            codes = qw.codes().double().numpy()
            scale = qw.params["scale"].double().numpy().repeat(32, axis=1)
            w = (codes - 4) * scale
            ref.get_submodule(name).weight.data = torch.from_numpy(w).float()
    ids = torch.randint(0, 4096, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = result.model(input_ids=ids).logits
        b = ref(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert np.isfinite(a.numpy()).all()


def test_calibration_text_shorter_than_asked_is_a_note(tiny_model, capture_plugin, tmp_path) -> None:
    folder = tiny_model("llama")
    text = tmp_path / "short.txt"
    text.write_text("x = 1\n" * 10)
    result = qf.run(str(folder), quantizer="capture-check", format="int8",
                    calibrator_options={"path": str(text), "n_samples": 4, "seq_len": 64}, out=None, progress=False)
    assert any("tokens, fewer than" in n for n in result.notes)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(qf.QFError, match="calibration text .*empty.txt is empty"):
        qf.run(str(folder), quantizer="capture-check", format="int8",
               calibrator_options={"path": str(empty)}, out=None, progress=False)


def test_bfloat16_block_work_gives_the_same_codes_and_float32_evaluation(tiny_model) -> None:
    folder = tiny_model("llama")  # stored in bf16: converting to bf16 or fp32 is exact either way
    a = qf.run(str(folder), format="int4-g32", evaluators=["perplexity"], out=None, keep_model=True,
               progress=False)
    b = qf.run(str(folder), format="int4-g32", evaluators=["perplexity"], out=None, keep_model=True,
               dtype="bfloat16", progress=False)
    for (n, x), (_, y) in zip(((n, m) for n, m in a.model.named_modules() if isinstance(m, QuantLinear)),
                              ((n, m) for n, m in b.model.named_modules() if isinstance(m, QuantLinear)),
                              strict=True):
        assert torch.equal(x.qweight.packed, y.qweight.packed), n
    assert a.metrics["perplexity"]["perplexity"] == b.metrics["perplexity"]["perplexity"]


def test_a_parameter_the_checkpoint_lacks_is_an_error_not_dropped(tiny_model, tmp_path, register_plugin) -> None:
    """A stage that adds a parameter to a block would lose it silently in the artifact (no
    checkpoint name, no tie): the run stops and names it."""
    import pytest
    from quantfoundry.errors import QFError

    class AddsParameter(qf.Transform):
        name = "adds-parameter"

        def transform_block(self, block, ctx):
            block.module.register_parameter("extra_scale", torch.nn.Parameter(torch.ones(4), requires_grad=False))

    class P:
        @qf.hookimpl
        def qf_register_quantizers(self, register):
            register(AddsParameter)

    register_plugin(P(), "adds-parameter")
    with pytest.raises(QFError, match=r"model.layers.0.extra_scale is a parameter of the quantized model but not a "
                                      r"tensor of the checkpoint"):
        qf.run(tiny_model("llama"), quantizer=[("adds-parameter", {}), ("rtn", {})], format="int4-g32",
               out=tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))


def test_checkpoint_tensors_that_are_no_parameter_are_kept(tiny_model, tmp_path) -> None:
    """A tensor stored inside a block that the model has no parameter for (an old checkpoint's
    rotary inv_freq) is written to the artifact as stored, and the run says so."""
    from safetensors.torch import load_file, save_file

    folder = tiny_model("llama")
    state = load_file(str(folder / "model.safetensors"))
    extra = "model.layers.1.self_attn.rotary_emb.inv_freq"
    state[extra] = torch.arange(8, dtype=torch.float32)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    result = qf.run(folder, format="int4-g32", out=tmp_path / "o", progress=False)
    assert torch.equal(load_file(str(tmp_path / "o" / "model.safetensors"))[extra], state[extra])
    assert any("no parameter of the model (written as stored)" in n and extra in n for n in result.notes)

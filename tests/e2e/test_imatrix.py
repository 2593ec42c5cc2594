"""``imatrix``: the core collects each linear's mean squared input per channel in the block pass."""

from __future__ import annotations

import quantfoundry as qf
import torch
from quantfoundry.hookspecs import hookimpl
from quantfoundry.pipeline.components import make

CAL = {"n_samples": 6, "seq_len": 48}
seen: dict[str, torch.Tensor | None] = {}


class RecordingRTN(qf.Quantizer):
    """RTN that records the importance it was handed."""

    name = "recording-rtn"
    scope = "tensor"

    def quantize_tensor(self, name, weight, fmt, ctx):
        imp = ctx.importance.get(name)
        seen[name] = None if imp is None else imp.clone()
        return fmt.quantize(weight, imp)


class _Plugin:
    @hookimpl
    def qf_register_quantizers(self, register):
        register(RecordingRTN)


def float64_importance(folder, layer: int) -> dict[str, torch.Tensor]:
    """Mean squared input per channel of layer ``layer``'s linears, float model, float64 sums."""
    from quantfoundry import resolve_model
    from transformers import AutoModelForCausalLM

    source = resolve_model(folder)
    ids = make("calibrator", "text", CAL).load(source.tokenizer()).input_ids
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    prefix = f"model.layers.{layer}."
    handles = []
    for name, mod in model.named_modules():
        if name.startswith(prefix) and isinstance(mod, torch.nn.Linear):
            def hook(_m, args, _n=name):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sums[_n] = sums.get(_n, 0) + x.square().sum(0)
                counts[_n] = counts.get(_n, 0) + x.shape[0]
            handles.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        for batch in ids.split(8):
            model(input_ids=batch)
    for h in handles:
        h.remove()
    return {n: sums[n] / counts[n] for n in sums}


def test_imatrix_is_the_mean_squared_input_per_channel(tiny_model, register_plugin) -> None:
    register_plugin(_Plugin(), "recording")
    folder = tiny_model("llama")
    seen.clear()
    r = qf.run(folder, quantizer="recording-rtn", format="int4-g32", imatrix=True, calibrator_options=CAL,
               out=None, evaluators=[], progress=False)
    assert any("imatrix" in n for n in r.notes)
    assert seen and all(v is not None for v in seen.values())
    want = float64_importance(folder, 0)
    layer0 = {n: v for n, v in seen.items() if n.startswith("model.layers.0.")}
    assert set(layer0) == set(want) and len(layer0) == 7
    for name, imp in layer0.items():
        assert imp.dtype == torch.float32 and imp.shape == want[name].shape
        torch.testing.assert_close(imp.double(), want[name], rtol=1e-5, atol=0)
    # q, k and v read the same normalized hidden state: the same importance
    assert torch.equal(seen["model.layers.1.self_attn.q_proj"], seen["model.layers.1.self_attn.v_proj"])


def test_no_imatrix_unless_asked(tiny_model, register_plugin) -> None:
    register_plugin(_Plugin(), "recording")
    seen.clear()
    qf.run(tiny_model("llama"), quantizer="recording-rtn", format="int8", out=None, evaluators=[], progress=False)
    assert seen and all(v is None for v in seen.values())

"""W8A8 in the pipeline: static input scales calibrated in the block pass from the inputs the
quantized model produces, the next block's inputs computed with quantized inputs, the scheme
and scales stored in the artifact and simulated again when it is reloaded."""

from __future__ import annotations

import numpy as np
import pytest
import quantfoundry as qf
import torch
from quantfoundry.errors import IncompatiblePlanError, UsageError
from quantfoundry.pipeline.components import make
from quantfoundry.roles.kernel import QuantLinear

CAL = {"n_samples": 6, "seq_len": 48}


def reference_scales(folder, artifact, ids: torch.Tensor, layers: int, qmax: float) -> dict[str, float]:
    """max|x| / qmax of every linear's input in the first ``layers`` blocks, from the float model
    with every quantized weight replaced by the artifact's dequantized one and, in the blocks
    before the one observed (not inside it: the scales are observed with its inputs in float),
    every linear's input fake-quantized with the artifact's scales (a float64 int8 reference:
    ``clip(round(x / s), -128, 127) · s``)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    quantized = {n: m for n, m in artifact.named_modules() if isinstance(m, QuantLinear)}
    for name, mod in quantized.items():
        model.get_submodule(name).weight.data = mod.qweight.dequantize()
    seen: dict[str, float] = {}
    for layer in range(layers):
        handles = []
        for name, mod in quantized.items():
            index = int(name.split(".")[2])
            if index > layer:
                continue

            def hook(_m, args, _n=name, _s=float(mod.input_scale), _observe=index == layer):
                x = args[0]
                if _observe:
                    seen[_n] = max(seen.get(_n, 0.0), float(x.double().abs().max()))
                    return None
                q = np.clip(np.round(x.double().numpy() / _s), -128, 127) * _s
                return (torch.from_numpy(q).to(x.dtype),)
            handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
        with torch.no_grad():
            for batch in ids.split(8):
                model(input_ids=batch)
        for h in handles:
            h.remove()
    return {n: v / qmax for n, v in seen.items()}


def test_static_int8_scales_are_the_absmax_of_the_quantized_models_inputs(tiny_model, tmp_path) -> None:
    folder = tiny_model("llama", num_hidden_layers=2)
    out = tmp_path / "w8a8"
    r = qf.run(folder, quantizer="rtn", format="int8-sym", activations="int8-static", calibrator_options=CAL,
               out=out, evaluators=[], progress=False)
    assert any("activations: int8 symmetric, one static scale per tensor (absmax observer)" in n for n in r.notes)
    artifact = qf.load(out)
    linears = {n: m for n, m in artifact.named_modules() if isinstance(m, QuantLinear)}
    assert len(linears) == 14 and all(m.input_quant == qf.ActQuant("int8", dynamic=False) for m in linears.values())
    source = qf.resolve_model(folder)
    ids = make("calibrator", "text", CAL).load(source.tokenizer()).input_ids
    want = reference_scales(folder, artifact, ids, 2, 127.0)
    assert set(want) == set(linears)
    for name, mod in linears.items():
        assert mod.input_scale.dtype == torch.float32 and mod.input_scale.shape == (1,)
        assert float(mod.input_scale) == pytest.approx(want[name], rel=1e-5), name
    manifest = r.manifest["plan"]["model.layers.1.mlp.down_proj"]
    assert manifest["input_quant"] == "int8-static"


def test_the_reloaded_w8a8_model_computes_what_the_run_measured(tiny_model, tmp_path) -> None:
    """Dynamic fp8 inputs: the in-memory model and the reloaded artifact give the same logits,
    and they differ from weight-only (the simulation is on)."""
    folder = tiny_model("llama", num_hidden_layers=2)
    kw = dict(quantizer="rtn", format="fp8-e4m3", out=None, evaluators=[], progress=False, keep_model=True)
    w8a8 = qf.run(folder, activations="fp8", **kw, )
    weight_only = qf.run(folder, **kw)
    out = tmp_path / "fp8"
    qf.run(folder, activations="fp8", **{**kw, "out": out, "keep_model": False})
    ids = torch.randint(0, 200, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = w8a8.model(input_ids=ids).logits
        b = qf.load(out)(input_ids=ids).logits
        c = weight_only.model(input_ids=ids).logits
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_activation_schemes_are_checked_before_any_work(tiny_model) -> None:
    folder = tiny_model("llama")
    with pytest.raises(UsageError, match="--activations: unknown activation scheme 'int4'"):
        qf.run(folder, activations="int4", out=None, evaluators=[], progress=False)
    with pytest.raises(UsageError, match="--act-observer calibrates static scales"):
        qf.run(folder, activations="int8", act_observer="mse", out=None, evaluators=[], progress=False)
    with pytest.raises(IncompatiblePlanError, match="exporter 'gguf' cannot store int8 activations"):
        qf.run(folder, activations="int8", exporter="gguf", format="q8_0", out=None, evaluators=[],
               progress=False)

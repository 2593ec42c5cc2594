"""SmoothQuant against float64 references of the paper's equations, on tiny real models."""

from __future__ import annotations

import numpy as np
import pytest
import quantfoundry as qf
import torch
from qf_smoothquant.transform import SmoothQuant, SmoothQuantOptions
from quantfoundry.pipeline.components import make
from quantfoundry.roles.exporter import default_plan
from quantfoundry.toolkit import BlockStream

CAL = {"n_samples": 4, "seq_len": 32}


def calibration(folder) -> torch.Tensor:
    return make("calibrator", "text", CAL).load(qf.resolve_model(folder).tokenizer()).input_ids


def first_block(folder, acts: str | None = None, **opts):
    """Block 0 of ``folder`` in float32 with its calibration inputs, after ``smoothquant``
    (the transform alone), and the float model before."""
    from transformers import AutoModelForCausalLM

    source = qf.resolve_model(folder)
    plan = default_plan(source, qf.resolve_format("int8-sym"))
    if acts:
        for e in plan.quantized().values():
            e.input_quant = qf.ActQuant.from_spec(acts)
    stream = BlockStream(source, calibration=calibration(folder), batch_size=2, plan=plan)
    block = next(iter(stream))
    before = {n: p.detach().clone() for n, p in block.module.named_parameters()}
    SmoothQuant(SmoothQuantOptions(**opts)).transform_block(block, qf.QuantContext(torch.device("cpu"), source=source))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    return block, before, model


def layer0_inputs(model, ids: torch.Tensor) -> dict[str, np.ndarray]:
    """max|x| per channel (float64) of every linear of layer 0 in the float model."""
    seen: dict[str, np.ndarray] = {}
    handles = []
    for name, mod in model.model.layers[0].named_modules():
        if isinstance(mod, torch.nn.Linear):
            def hook(_m, args, _n=name):
                a = args[0].double().abs().reshape(-1, args[0].shape[-1]).amax(0).numpy()
                seen[_n] = np.maximum(seen.get(_n, a), a)
            handles.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        for b in ids.split(2):
            model(input_ids=b)
    for h in handles:
        h.remove()
    return seen


def ref_scale(x_max: np.ndarray, w_max: np.ndarray, alpha: float) -> np.ndarray:
    s = np.clip(np.maximum(x_max, 1e-5) ** alpha / np.maximum(w_max, 1e-5) ** (1 - alpha), 1e-5, None)
    return np.where(x_max > 0, s, 1.0)


@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_scales_follow_the_papers_formula_and_the_model_is_unchanged(tiny_model, alpha: float) -> None:
    folder = tiny_model("llama", dtype=torch.float32)
    block, before, model = first_block(folder, alpha=alpha)
    x = layer0_inputs(model, calibration(folder))
    after = dict(block.module.named_parameters())
    # input norm -> q/k/v: columns times s, the norm's weight divided by it
    w_max = np.max([before[f"self_attn.{p}_proj.weight"].double().abs().amax(0).numpy() for p in "qkv"], axis=0)
    s = ref_scale(x["self_attn.q_proj"], w_max, alpha)
    for p in "qk":
        np.testing.assert_allclose(after[f"self_attn.{p}_proj.weight"].double().numpy(),
                                   before[f"self_attn.{p}_proj.weight"].double().numpy() * s, rtol=2e-6)
    np.testing.assert_allclose(after["input_layernorm.weight"].double().numpy(),
                               before["input_layernorm.weight"].double().numpy() / s, rtol=2e-6)
    # post-attention norm -> gate/up, then up -> down: down's columns times s, up's rows divided
    s_down = ref_scale(x["mlp.down_proj"], before["mlp.down_proj.weight"].double().abs().amax(0).numpy(), alpha)
    np.testing.assert_allclose(after["mlp.down_proj.weight"].double().numpy(),
                               before["mlp.down_proj.weight"].double().numpy() * s_down, rtol=2e-6)
    w_gu = np.max([before[f"mlp.{p}_proj.weight"].double().abs().amax(0).numpy() for p in ("gate", "up")], axis=0)
    s_gu = ref_scale(x["mlp.gate_proj"], w_gu, alpha)
    np.testing.assert_allclose(after["mlp.gate_proj.weight"].double().numpy(),
                               before["mlp.gate_proj.weight"].double().numpy() * s_gu, rtol=2e-6)
    np.testing.assert_allclose(after["mlp.up_proj.weight"].double().numpy(),
                               before["mlp.up_proj.weight"].double().numpy() * s_gu / s_down[:, None], rtol=2e-6)
    # v -> o under GQA (4 query heads over 2 KV heads of 16): one scale per KV channel, the max
    # over the query-head channels sharing it
    c = np.arange(64)
    kv = c // 32 * 16 + c % 16
    xo, wo = x["self_attn.o_proj"], before["self_attn.o_proj.weight"].double().abs().amax(0).numpy()
    s_kv = ref_scale(np.array([xo[kv == k].max() for k in range(32)]), np.array([wo[kv == k].max() for k in range(32)]),
                     alpha)
    np.testing.assert_allclose(after["self_attn.o_proj.weight"].double().numpy(),
                               before["self_attn.o_proj.weight"].double().numpy() * s_kv[kv], rtol=2e-6)
    # v: its columns smoothed with q and k, its rows (the KV channels) divided by o's scale
    np.testing.assert_allclose(after["self_attn.v_proj.weight"].double().numpy(),
                               before["self_attn.v_proj.weight"].double().numpy() * s / s_kv[:, None], rtol=2e-6)
    # the float block computes what it did
    h, kw = block.inputs.hidden[0], block.inputs.kwargs[0]
    with torch.no_grad():
        new = block.module(h, **kw)
        new = new[0] if isinstance(new, tuple) else new
        ref = model.model.layers[0](h, **kw)
        ref = ref[0] if isinstance(ref, tuple) else ref
    torch.testing.assert_close(new, ref, rtol=1e-4, atol=1e-5)


def test_norms_only_leaves_the_linear_folds(tiny_model) -> None:
    folder = tiny_model("llama", dtype=torch.float32)
    block, before, _ = first_block(folder, folds="norms")
    after = dict(block.module.named_parameters())
    assert torch.equal(after["mlp.down_proj.weight"], before["mlp.down_proj.weight"])
    assert torch.equal(after["self_attn.o_proj.weight"], before["self_attn.o_proj.weight"])
    assert not torch.equal(after["self_attn.q_proj.weight"], before["self_attn.q_proj.weight"])


def outlier_model(tiny_model):
    """A tiny model whose norms give a few input channels 30x the others (the activation
    outliers SmoothQuant is for)."""
    from safetensors.torch import load_file, save_file

    folder = tiny_model("llama", dtype=torch.float32)
    tensors = load_file(folder / "model.safetensors")
    for name, t in tensors.items():
        if name.endswith("layernorm.weight"):
            t[[3, 17, 40]] *= 30
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_the_searched_alpha_is_the_grid_minimum_of_the_w8a8_error(tiny_model) -> None:
    """The search scores every α of the grid with a float64 W8A8 output error written here
    (int8 per-token inputs, int8-sym per-channel weights) and keeps the smallest."""
    folder = outlier_model(tiny_model)
    block, before, model = first_block(folder, acts="int8", search=True, alpha_grid=10, folds="norms")
    after = dict(block.module.named_parameters())
    # the α chosen for q/k/v, read back from the folded norm
    x_rows = []
    model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda _m, a: x_rows.append(a[0].reshape(-1, a[0].shape[-1]).double()))
    with torch.no_grad():
        for b in calibration(folder).split(2):
            model(input_ids=b)
    x = torch.cat(x_rows)[:2048].numpy()
    x_max = np.abs(torch.cat(x_rows).numpy()).max(0)
    ws = [before[f"self_attn.{p}_proj.weight"].double().numpy() for p in "qkv"]
    w_max = np.max([np.abs(w).max(0) for w in ws], axis=0)

    def err(alpha: float) -> float:
        s = ref_scale(x_max, w_max, alpha)
        xs = x / s
        amax = np.abs(xs).max(1, keepdims=True)
        xq = np.clip(np.round(xs * (127 / amax)), -128, 127) * (amax / 127)
        total = 0.0
        for w in ws:
            wsc = w * s
            sc = 2 * np.abs(wsc).max(1, keepdims=True) / 255
            wq = (np.clip(np.round(wsc / sc) + 128, 0, 255) - 128) * sc
            total += np.sum((x @ w.T - xq @ wq.T) ** 2)
        return total

    errors = {a / 10: err(a / 10) for a in range(11)}
    ratio = before["input_layernorm.weight"].double().numpy() / after["input_layernorm.weight"].double().numpy()
    chosen = min(errors, key=lambda a: np.abs(ref_scale(x_max, w_max, a) - ratio).max())
    np.testing.assert_allclose(ratio, ref_scale(x_max, w_max, chosen), rtol=1e-5)
    assert errors[chosen] <= min(errors.values()) * (1 + 1e-3)
    assert chosen > 0  # with outliers, smoothing beats none


def test_smoothing_lowers_the_w8a8_error_on_outliers(tiny_model) -> None:
    folder = outlier_model(tiny_model)
    kw = dict(format="int8-sym", activations="int8-static", calibrator_options=CAL, out=None,
              evaluators=[("kl", {"max_tokens": 2048})], progress=False)
    naive = qf.run(folder, quantizer="rtn", **kw).metrics["kl"]["kl_mean"]["quantized"]
    smooth = qf.run(folder, quantizer=[("smoothquant", {}), ("rtn", {})], **kw).metrics["kl"]["kl_mean"]["quantized"]
    assert smooth < 0.7 * naive


def test_bad_options_are_one_line() -> None:
    for bad, match in (({"alpha": 1.5}, "alpha must be in"), ({"folds": "some"}, "folds must be all or norms"),
                       ({"alpha_grid": 0}, "alpha_grid and search_tokens")):
        with pytest.raises(ValueError, match=match):
            SmoothQuantOptions(**bad)

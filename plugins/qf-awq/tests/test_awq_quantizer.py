"""awq on real decoder blocks: salient channels are protected (block output error below RTN's),
groups without a fold point are skipped with a note. (That folding is exact in float64 for every
built-in architecture is the toolkit's test: tests/unit/test_fold.py.)"""

from __future__ import annotations

import dataclasses

import pytest
import quantfoundry as qf
import torch
from qf_awq import search
from qf_awq.quantizer import AWQOptions, AWQQuantizer
from qf_awq.search import search_clip, search_scale
from quantfoundry import InputGroup, resolve_model
from quantfoundry.toolkit import capture_inputs
from transformers import AutoModelForCausalLM

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _first_block(folder, spec="int3-g32", n=8, seq=64, salient=()):
    source = resolve_model(folder)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():  # planted salient input channels: the norms amplify them 20×
        for idx in salient:
            for layer in model.model.layers:
                layer.input_layernorm.weight[idx] *= 20
                layer.post_attention_layernorm.weight[idx] *= 20
    ids = torch.randint(0, 4096, (n, seq), generator=torch.Generator().manual_seed(0))
    layers = model.model.layers
    inputs, kwargs = capture_inputs(model, layers, model.model.norm, list(ids.split(2)))
    fmt = qf.resolve_format(spec)
    return qf.Block(0, "model.layers.0", layers[0], source.architecture, {n: fmt for n in LINEARS},
                    qf.BlockInputs(inputs.hidden, kwargs[0])), source


def _output_error(block, reference_outputs, out):
    for name, qw in out.items():
        block.linear(name).weight.data = qw.dequantize(torch.float32)
    got = block.run()
    return sum(float(((g.double() - r.double()) ** 2).sum()) for g, r in zip(got, reference_outputs, strict=True))


def test_salient_channels_block_error_below_rtn(tiny_model):
    """With a few input channels 20× larger than the rest, AWQ's quantized block is closer to
    the float block (squared error of its outputs on the calibration inputs) than RTN's on the
    same grid, with and without clipping."""
    folder = tiny_model("llama")
    for clip in (False, True):
        block, source = _first_block(folder, salient=(3, 17, 40))
        reference = block.run()
        ctx = qf.QuantContext(torch.device("cpu"), source=source)
        rtn = {n: block.formats[n].quantize(block.linear(n).weight.float()) for n in LINEARS}
        rtn_error = _output_error(block, reference, rtn)
        block, _ = _first_block(folder, salient=(3, 17, 40))
        out = AWQQuantizer(AWQOptions(clip=clip)).quantize_block(block, ctx)
        awq_error = _output_error(block, reference, out)
        assert awq_error < 0.8 * rtn_error, (clip, awq_error, rtn_error)
        assert any(qw.meta["awq"].get("alpha", 0) > 0 for qw in out.values())


def test_search_objective_is_the_output_error_on_the_tokens():
    """The objective the search minimises, tr(E H Eᵀ) from the Gram matrix, equals the output
    error computed from the tokens themselves (float64), and the chosen scale beats s = 1."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=gen)
    x[:, [5, 9]] *= 30
    w = torch.randn(48, 64, generator=gen) * 0.05
    fmt = qf.resolve_format("int3-g32")
    gram = x.T @ x / x.shape[0]
    res = search_scale([w], [fmt], x.abs().mean(0), gram, None, n_grid=20, duo_scaling=False)
    s = res.scale
    w_hat = fmt.quantize(w * s).dequantize(torch.float64) / s.double()
    direct = float(((x.double() @ (w.double() - w_hat).T) ** 2).sum() / x.shape[0])
    assert res.loss == pytest.approx(direct, rel=1e-4)
    rtn = float(((x.double() @ (w.double() - fmt.quantize(w).dequantize(torch.float64)).T) ** 2).sum() / x.shape[0])
    assert res.loss_rtn == pytest.approx(rtn, rel=1e-4)
    assert res.alpha > 0 and res.loss < 0.8 * rtn


@pytest.mark.parametrize("spec", ["int4-g32", "Q4_K", "Q6_K"])
@pytest.mark.parametrize("batch", [1 << 23, 3000])
def test_batched_searches_equal_one_candidate_at_a_time(spec, batch, monkeypatch):
    """The searches score grid points in batches stacked along the rows (per-row importance for
    the K-quants); the chosen α, clipping and losses are those of fitting each candidate on its
    own with ``quantize`` and scoring it from the tokens in float64 — whether every candidate
    fits in one batch or each batch holds one."""
    monkeypatch.setattr(search, "BATCH_ELEMENTS", batch)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(300, 256, generator=gen)
    x[:, [3, 100, 200]] *= 20
    ws = [torch.randn(16, 256, generator=gen) * 0.05, torch.randn(8, 256, generator=gen) * 0.05]
    ws[0][:, ::7] *= 4  # heavy tails: clipping pays, even at 6 bits
    fmt = qf.resolve_format(spec)
    gram = x.T @ x / x.shape[0]
    imp = torch.diagonal(gram).clone()
    res = search_scale(ws, [fmt, fmt], x.abs().mean(0), gram, imp, n_grid=10, duo_scaling=False)

    def error(w, w_hat):
        return float(((x.double() @ (w.double() - w_hat).T) ** 2).sum() / x.shape[0])

    losses = []
    for i in range(10):
        s = x.abs().mean(0).pow(i / 10).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        losses.append(sum(error(w, fmt.quantize(w * s, imp / s.square()).dequantize(torch.float64) / s.double())
                          for w in ws))
    assert res.alpha == losses.index(min(losses)) / 10
    assert res.loss == pytest.approx(min(losses), rel=1e-4)
    assert res.loss_rtn == pytest.approx(losses[0], rel=1e-4)
    assert res.losses.tolist() == pytest.approx(losses, rel=1e-4)

    w = ws[0]
    clip = search_clip(w, fmt, gram, imp, n_grid=10, max_shrink=0.5)
    clipped, before, after = clip.clipped, clip.loss_before, clip.loss_after
    g = fmt.group_size(256)
    top = w.view(16, -1, g).abs().amax(-1, keepdim=True)
    unit_losses = []
    for i in range(5):
        m = top * (1 - i / 10)
        e = (w.double() - fmt.quantize(torch.maximum(torch.minimum(w.view(16, -1, g), m), -m).view(16, 256),
                                       imp).dequantize(torch.float64)).view(16, -1, g)
        xs = x.double().view(300, -1, g)
        unit_losses.append(torch.einsum("rgi,tgi->rgt", e, xs).square().sum(-1) / x.shape[0])
    stacked = torch.stack(unit_losses)
    assert before == pytest.approx(float(stacked[0].sum()), rel=1e-4)
    assert after == pytest.approx(float(stacked.amin(0).sum()), rel=1e-4)
    # each unit clipped at one of the grid's magnitudes, the one of least loss (to float32 ties)
    chosen = torch.round((1 - clipped.view(16, -1, g).abs().amax(-1) / top.squeeze(-1)) * 10).long()
    picked = stacked.gather(0, chosen[None]).squeeze(0)
    assert (picked <= stacked.amin(0) * (1 + 1e-5)).all()
    assert chosen.max() > 0, "nothing clipped: the test would not see a wrong choice"
    assert torch.equal(clip.best, chosen) and torch.allclose(clip.losses, stacked, rtol=1e-4)


@pytest.mark.parametrize("exact", [True, False])
def test_searches_rank_with_the_exact_or_the_search_roundtrip(exact, monkeypatch):
    """``exact_search`` true ranks AWQ's candidates with the format's exact round trip, false
    (the default) with its round trip for searches (``Format.roundtrip(for_search=True)``: for
    K-quants on CPU, qf-gguf's search kernels); either way the choice is the argmin of the
    losses computed candidate by candidate with that round trip, and only it is called."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(300, 256, generator=gen)
    x[:, [3, 100, 200]] *= 20
    w = torch.randn(16, 256, generator=gen) * 0.05
    fmt = qf.resolve_format("Q4_K")
    gram = x.T @ x / x.shape[0]
    imp = torch.diagonal(gram).clone()
    roundtrip = type(fmt).roundtrip
    seen = []

    def spy(self, w, importance=None, *, for_search=False):
        seen.append(for_search)
        return roundtrip(self, w, importance, for_search=for_search)

    monkeypatch.setattr(type(fmt), "roundtrip", spy)
    res = search_scale([w], [fmt], x.abs().mean(0), gram, imp, n_grid=8, duo_scaling=False, exact=exact)
    assert seen and set(seen) == {not exact}

    def loss(s):
        w_hat = roundtrip(fmt, w * s, imp / s.square(), for_search=not exact).double() / s.double()
        return float(((x.double() @ (w.double() - w_hat).T) ** 2).sum() / x.shape[0])

    losses = []
    for i in range(8):
        s = x.abs().mean(0).pow(i / 8).clamp(min=1e-4)
        losses.append(loss(s / (s.max() * s.min()).sqrt()))
    assert res.alpha == losses.index(min(losses)) / 8
    assert res.loss == pytest.approx(min(losses), rel=1e-4)
    assert AWQOptions().exact_search is False


def test_group_without_fold_point_is_skipped_with_a_note(tiny_model):
    """An architecture map whose o_proj group has no fold point: that group is rounded
    without scaling, the run notes it, every other group is scaled."""
    block, source = _first_block(tiny_model("llama"))
    arch = block.architecture
    groups = list(arch.groups)
    groups[1] = InputGroup(("self_attn.o_proj",), None, "none")
    block.architecture = dataclasses.replace(arch, groups=tuple(groups))
    ctx = qf.QuantContext(torch.device("cpu"), source=source)
    out = AWQQuantizer(AWQOptions()).quantize_block(block, ctx)
    assert set(out) == set(LINEARS)
    assert any("self_attn.o_proj not scaled: nothing before it" in n for n in ctx.notes), ctx.notes
    assert "alpha" not in out["self_attn.o_proj"].meta["awq"]
    assert "alpha" in out["mlp.down_proj"].meta["awq"]


def test_run_end_to_end_and_bad_options(tmp_path):
    r = qf.run(quantizer="awq", format="int4-g64", out=tmp_path / "out", progress=False, evaluators=["kl"],
               calibrator_options={"n_samples": 8, "seq_len": 128})
    assert r.manifest["evaluation"]["artifact_check"]["ok"]
    from quantfoundry.errors import OptionsError

    with pytest.raises(OptionsError, match="max_shrink"):
        qf.run(quantizer="awq", quantizer_options={"max_shrink": "1.5"}, progress=False)

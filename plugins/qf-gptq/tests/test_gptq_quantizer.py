"""The gptq quantizer on real decoder blocks: Hessians, sharing, true-sequential order,
K-quant grids, calibration edge cases."""

from __future__ import annotations

import pytest
import quantfoundry as qf
import torch
from qf_gptq.quantizer import GPTQOptions, GPTQQuantizer
from quantfoundry.errors import UsageError
from quantfoundry.testing import LINEARS, inputs_of
from quantfoundry.testing import first_block as tiny_first_block


def first_block(folder, spec="int4-g32", n=4, seq=48):
    return tiny_first_block(folder, spec, n=n, seq=seq)


def test_true_sequential_each_group_sees_the_quantized_groups_before_it(tiny_model, monkeypatch):
    """o_proj's Hessian comes from attention outputs computed with q/k/v already quantized,
    down_proj's from an MLP whose gate/up are quantized; without true_sequential every
    Hessian comes from the float block."""
    folder = tiny_model("llama")
    seen: dict[str, torch.Tensor] = {}

    def record(self, block, members, hessian, ctx):
        seen[members[0]] = hessian.clone()
        return original(self, block, members, hessian, ctx)

    original = GPTQQuantizer._solve
    monkeypatch.setattr(GPTQQuantizer, "_solve", record)
    for sequential in (True, False):
        seen.clear()
        block = first_block(folder)
        float_block = first_block(folder)
        out = GPTQQuantizer(GPTQOptions(true_sequential=sequential)).quantize_block(
            block, qf.QuantContext(torch.device("cpu")))
        # expected: the float block with the groups before each one replaced by their result
        for owner, before in [("self_attn.o_proj", LINEARS[:3]), ("mlp.down_proj", LINEARS[:6])]:
            if sequential:
                for n in before:
                    float_block.linear(n).weight.data = out[n].dequantize()
            x = inputs_of(float_block, owner)
            torch.testing.assert_close(seen[owner].double(), 2 * x.T @ x / x.shape[0], rtol=1e-5, atol=1e-6)
        if not sequential:
            x = inputs_of(float_block, "mlp.down_proj")
            assert seen["mlp.down_proj"].shape == (x.shape[1], x.shape[1])


def test_replaying_finished_linears_changes_nothing(tiny_model, monkeypatch):
    """True-sequential forwards replay the outputs of linears that are already final (q/k/v in
    the o, gate/up and output forwards; o in the latter two; gate/up in the last), and of the
    attention as a whole once all its linears are, instead of recomputing them: the weights,
    and the block outputs handed to the next block, are those of a run that recomputes
    everything."""
    from qf_gptq import quantizer as qmod

    made = []

    class Spy(qmod.OutputReplay):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    monkeypatch.setattr(qmod, "OutputReplay", Spy)
    folder = tiny_model("llama")
    ctx = qf.QuantContext(torch.device("cpu"))
    plain, replayed = first_block(folder), first_block(folder)
    want = GPTQQuantizer(GPTQOptions(replay_mb=0)).quantize_block(plain, ctx)
    q_calls = []
    replayed.linear("self_attn.q_proj").register_forward_hook(lambda *a: q_calls.append(1))
    got = GPTQQuantizer(GPTQOptions()).quantize_block(replayed, ctx)
    assert made[0].replayed == 0 and plain.outputs is None
    n_batches = len(replayed.inputs.hidden)
    assert made[1].replayed == n_batches * (3 + 4 + 6)
    # the attention as a whole is replayed once o_proj is final: q_proj runs in the q/k/v forward,
    # is replayed in the o forward, and runs inside the attention once more, when that is recorded
    assert "self_attn" in made[1].outputs and len(q_calls) == 3 * n_batches
    for name in LINEARS:
        assert torch.equal(want[name].codes(), got[name].codes()), name
        for k, v in want[name].params.items():
            assert torch.equal(v, got[name].params[k]), (name, k)
    expected = plain.run()  # the block loop's own run: every linear holds its dequantized weight
    assert len(replayed.outputs) == n_batches
    for x, y in zip(expected, replayed.outputs, strict=True):
        torch.testing.assert_close(y, x, rtol=0, atol=0)


def test_block_error_below_rtn(tiny_model):
    """On a real block, each linear's output error on its calibration inputs is below RTN's."""
    folder = tiny_model("llama")
    block = first_block(folder, "int3-g32", n=8, seq=64)
    ref = first_block(folder, "int3-g32", n=8, seq=64)
    out = GPTQQuantizer(GPTQOptions(true_sequential=False)).quantize_block(
        block, qf.QuantContext(torch.device("cpu")))
    fmt = qf.resolve_format("int3-g32")
    for name in LINEARS:
        w = ref.linear(name).weight.data.double()
        x = inputs_of(ref, name)
        gptq = ((x @ (w - out[name].dequantize(torch.float64)).T) ** 2).sum()
        rtn = ((x @ (w - fmt.quantize(w.float()).dequantize(torch.float64)).T) ** 2).sum()
        assert gptq < rtn, name


def test_kquant_superblocks_are_fitted_when_the_loop_reaches_them():
    """On a Q4_K grid the first super-block's parameters are exactly what the format fits on the
    untouched weights (with the Hessian diagonal as importance); the stored codes decode to the
    values the loop fed back, and the output error is below llama.cpp-style RTN's."""
    import qf_gguf  # noqa: F401 - a hard requirement: CI installs qf-gguf, so these checks run, never skip
    from quantfoundry.toolkit import Segment, ldlq_solve

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 512, generator=g) @ (torch.randn(512, 512, generator=g) / 512 ** 0.5)
    h = (2 * x.T @ x / x.shape[0]).float()
    w = torch.randn(64, 512, generator=g) * 0.02
    for spec in ("Q4_K", "Q6_K", "Q3_K", "Q2_K"):
        fmt = qf.resolve_format(spec)
        imp = torch.diagonal(h) / 2
        res = ldlq_solve(w, h, [Segment(0, 64, fmt)], importance=imp)
        first = {k: v for k, v in fmt.fit(w[:, :256], imp[:256]).items() if not k.startswith("_")}
        for k, v in first.items():
            assert torch.equal(res.params[0][k][:, :1], v), (spec, k)
        qw = qf.QuantizedWeight(fmt, (64, 512), torch.float32, fmt.pack(res.codes[0]), res.params[0])
        torch.testing.assert_close(qw.dequantize(), res.values, rtol=0, atol=0)
        err = ((x.double() @ (w - res.values).double().T) ** 2).sum()
        rtn = ((x.double() @ (w - fmt.quantize(w, imp).dequantize()).double().T) ** 2).sum()
        assert err < rtn, spec


def test_short_calibration_text_is_a_warning_with_the_token_count(tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 20)
    result = qf.run(quantizer="gptq", calibrator_options={"path": str(text), "n_samples": 4, "seq_len": 512},
                    progress=False)
    notes = " ".join(result.notes)
    assert "short.txt has" in notes and "tokens" in notes and "fewer than the 4 x 512" in notes


def test_empty_calibration_text_is_an_error_before_any_work(tmp_path):
    text = tmp_path / "empty.txt"
    text.write_text("  \n")
    with pytest.raises(UsageError, match="empty"):
        qf.run(quantizer="gptq", calibrator_options={"path": str(text)}, out=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_bad_options_are_one_line_errors():
    from quantfoundry.errors import OptionsError

    with pytest.raises(OptionsError, match="damp_percent"):
        qf.run(quantizer="gptq", quantizer_options={"damp_percent": "0"}, progress=False)
    with pytest.raises(OptionsError, match="desc_act"):
        qf.run(quantizer="gptq", quantizer_options={"desc_act": "maybe"}, progress=False)
    with pytest.raises(OptionsError, match="replay_mb"):
        qf.run(quantizer="gptq", quantizer_options={"replay_mb": "-5"}, progress=False)


def test_experts_cut_into_stages_by_stats_mb_give_the_same_artifact(tiny_model, tmp_path):
    """A MoE whose experts' Hessians (hidden 512: 2 MiB each in float64) exceed ``stats_mb=3``:
    the experts' gate/up stage runs as four forwards of one expert each; an expert's input
    depends on no other expert, so the artifact is the one of the uncut stage, byte for byte."""
    import hashlib

    folder = tiny_model("mixtral", hidden_size=512)
    common = dict(quantizer="gptq", calibrator_options={"n_samples": 4, "seq_len": 32}, evaluators=[],
                  progress=False)
    qf.run(folder, out=tmp_path / "cut", quantizer_options={"stats_mb": 3}, **common)
    qf.run(folder, out=tmp_path / "whole", quantizer_options={"stats_mb": 0}, **common)
    digest = {d: hashlib.sha256((tmp_path / d / "model.safetensors").read_bytes()).hexdigest() for d in ("cut", "whole")}
    assert digest["cut"] == digest["whole"]

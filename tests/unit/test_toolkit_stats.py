"""Streamed input statistics (quantfoundry.toolkit.collect_input_stats) against float64 sums
of the inputs captured from the block's own forward."""

from __future__ import annotations

import pytest
import quantfoundry as qf
import torch
from quantfoundry import resolve_model
from quantfoundry.toolkit import BlockStream, collect_input_stats

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@pytest.fixture
def block(tiny_model):
    source = resolve_model(tiny_model("llama"))
    ids = torch.randint(0, 4096, (4, 48), generator=torch.Generator().manual_seed(0))
    return next(iter(BlockStream(source, calibration=ids, batch_size=2)))


def captured(block, name):
    """Every input row of ``name`` in the block's forward (float64), hooked independently."""
    xs = []
    handle = block.linear(name).register_forward_pre_hook(
        lambda _m, args: xs.append(args[0].reshape(-1, args[0].shape[-1]).double()))
    try:
        block.run()
    finally:
        handle.remove()
    return torch.cat(xs)


def test_every_statistic_equals_the_float64_sums_of_the_inputs(block):
    stats = collect_input_stats(block, list(LINEARS), want=("gram", "abs_sum", "sq_sum", "absmax"))
    assert stats.sharing() == {
        "self_attn.q_proj": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        "self_attn.o_proj": ["self_attn.o_proj"],
        "mlp.gate_proj": ["mlp.gate_proj", "mlp.up_proj"],
        "mlp.down_proj": ["mlp.down_proj"],
    }
    for name in LINEARS:
        x = captured(block, name)
        st = stats[name]
        assert st.count == x.shape[0] == 4 * 48
        gram = x.T @ x  # float32 sums against float64: round-off relative to the largest entry
        torch.testing.assert_close(st.gram.double(), gram, rtol=1e-5, atol=1e-6 * float(gram.abs().max()))
        hess = 2 * gram / x.shape[0]
        torch.testing.assert_close(st.hessian().double(), hess, rtol=1e-5, atol=1e-6 * float(hess.abs().max()))
        torch.testing.assert_close(st.abs_mean.double(), x.abs().mean(0), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(st.sq_mean.double(), (x * x).mean(0), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(st.absmax.double(), x.abs().amax(0), rtol=0, atol=0)


def test_unshared_collection_gives_each_linear_its_own_entry(block):
    stats = collect_input_stats(block, ["self_attn.q_proj", "self_attn.k_proj"], want=("sq_sum",), share=False)
    assert stats.sharing() == {"self_attn.q_proj": ["self_attn.q_proj"], "self_attn.k_proj": ["self_attn.k_proj"]}
    assert torch.equal(stats["self_attn.q_proj"].sq_sum, stats["self_attn.k_proj"].sq_sum)
    assert stats["self_attn.q_proj"].gram is None
    with pytest.raises(ValueError, match="'gram' was not collected"):
        stats["self_attn.q_proj"].hessian()


def test_a_linear_no_token_reached_gets_zeros(block):
    empty = qf.Block(block.index, block.prefix, block.module, block.architecture, {},
                     qf.BlockInputs(hidden=[], kwargs=[]))
    stats = collect_input_stats(empty, ["mlp.down_proj"], want=("gram", "abs_sum"))
    st = stats["mlp.down_proj"]
    assert st.count == 0 and st.gram.shape == (128, 128) and not st.gram.any() and not st.abs_sum.any()
    assert not st.hessian().any()


def test_bad_requests_are_clear(block):
    with pytest.raises(ValueError, match="unknown statistic 'mean'"):
        collect_input_stats(block, ["mlp.down_proj"], want=("mean",))
    bare = qf.Block(block.index, block.prefix, block.module, block.architecture, {})
    with pytest.raises(ValueError, match="has no calibration inputs"):
        collect_input_stats(bare, ["mlp.down_proj"])

"""AWQ on a mixture of experts: the experts' shared scale is judged on each expert's own tokens."""

from __future__ import annotations

import quantfoundry as qf
import torch
from qf_awq.quantizer import AWQScaleOptions, scale_block
from quantfoundry.model.experts import expert_calibration  # the routing a run calibrates with
from quantfoundry.toolkit import BlockStream, block_groups


def test_the_experts_scale_and_clipping_see_each_experts_own_tokens(tiny_model):
    """Mixtral's post-attention norm feeds every expert's w1/w3 (one fold point, one scale), but
    each expert reads its own tokens (here ``fill`` routing, as a run calibrates). The search's
    objective at s = 1 equals, in float64 from the inputs each expert's w1 actually received,
    ``Σ_expert Σ_{w1,w3} ‖(W − RTN(W)) Xₑᵀ‖² / N`` (N: every expert's tokens), and each linear's
    Gram matrix for clipping is its own expert's ``XₑᵀXₑ / N`` under the folded scale."""
    folder = tiny_model("mixtral", dtype=torch.float32)
    source = qf.resolve_model(folder)
    ids = torch.randint(0, 4096, (4, 32), generator=torch.Generator().manual_seed(5))
    block = next(iter(BlockStream(source, calibration=ids, batch_size=2)))
    fmt = qf.resolve_format("int3-g32")
    linears = [n for n, m in block.module.named_modules() if isinstance(m, torch.nn.Linear) and ".experts." in n]
    block.formats = {n: fmt for n in linears}
    (group,) = [g for g in block_groups(block, "awq") if len({m.split(".")[-2] for m in g.members}) > 1]
    experts, _expert, first = group.members[0].rsplit(".", 2)  # block_sparse_moe.experts, 0, w1
    before = {m: block.linear(m).weight.detach().double().clone() for m in group.members}
    total = 4 * 32
    with expert_calibration(block.module, "fill", 16, total):
        rows: dict[str, list[torch.Tensor]] = {}
        names = [f"{experts}.{e}.{first}" for e in range(4)]
        with block.capture_inputs(names, lambda n, x: rows.setdefault(n.split(".")[-2], []).append(
                x.reshape(-1, x.shape[-1]).double())):
            block.run()
        x = {e: torch.cat(r) for e, r in rows.items()}
        assert len({len(v) for v in x.values()}) > 1  # the experts saw different numbers of tokens
        n = sum(len(v) for v in x.values())
        scaled = scale_block(block, qf.QuantContext(torch.device("cpu"), source=source), AWQScaleOptions(), "awq")
    expect = 0.0
    for m in group.members:
        w = before[m]
        err = w - fmt.quantize(w.float()).dequantize(torch.float32).double()
        expect += float(((err @ x[m.split(".")[-2]].T) ** 2).sum()) / n
    info = scaled.meta[group.members[0]]
    assert abs(info["loss_rtn"] - expect) <= 1e-4 * expect
    assert info["alpha"] > 0 and info["loss"] < info["loss_rtn"]
    w1 = group.members[0]  # (each w3 also takes its own w2's scale on its rows, folded next)
    s = (block.linear(w1).weight.detach().double() / before[w1]).median(0).values  # the folded scale
    for m in group.members:
        xe = x[m.split(".")[-2]]
        want = (xe.T @ xe / n) / (s[:, None] * s[None, :])
        torch.testing.assert_close(scaled.grams[m].double(), want, rtol=2e-4, atol=1e-6)

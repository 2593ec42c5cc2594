"""output-clip, the block quantizer of docs/writing-a-block-quantizer.md: its search lowers each
linear's output error on the calibration inputs below round-to-nearest's, computed here from
the captured inputs in float64."""

from __future__ import annotations

import pytest
import quantfoundry as qf
import torch
from qf_example_plugin import OutputClip
from quantfoundry import resolve_model
from quantfoundry.toolkit import BlockStream


def inputs_of(block, name):
    xs = []
    with block.capture_inputs([name], lambda _n, x: xs.append(x.reshape(-1, x.shape[-1]).double())):
        block.run()
    return torch.cat(xs)


@pytest.mark.parametrize("spec", ["int3-g32", "int4-g32"])
def test_output_error_below_round_to_nearest(tiny_model, spec) -> None:
    source = resolve_model(tiny_model("llama"))
    ids = torch.randint(0, 4096, (4, 64), generator=torch.Generator().manual_seed(0))
    fmt = qf.resolve_format(spec)
    block = next(iter(BlockStream(source, calibration=ids, batch_size=2)))
    block.formats = {n: fmt for n in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")}
    out = OutputClip().quantize_block(block, qf.QuantContext(device=torch.device("cpu"), source=source))
    for name, qw in out.items():
        w = block.linear(name).weight.double()
        x = inputs_of(block, name)
        ours = ((x @ (w - qw.dequantize(torch.float64)).T) ** 2).sum()
        rtn = ((x @ (w - fmt.quantize(w.float()).dequantize(torch.float64)).T) ** 2).sum()
        assert ours <= rtn, name
        assert ours < 0.97 * rtn, name  # the search finds better clips than none on most groups


def test_runs_end_to_end_with_calibration(tmp_path) -> None:
    result = qf.run(quantizer="output-clip", format="int3-g128", calibrator_options={"n_samples": 8, "seq_len": 128},
                    evaluators=["kl"], out=tmp_path / "o", progress=False)
    assert result.manifest["calibration"]["shape"] == [8, 128]
    assert result.manifest["evaluation"]["artifact_check"]["ok"]

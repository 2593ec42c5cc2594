"""Per-tensor parameters (data model v2, first user: NF4's double quantization) survive every
way a quantized weight travels: the qf artifact and its reload, the crash-resume journal, a
QuantLinear's buffers and device moves, and a kernel."""

from __future__ import annotations

import quantfoundry as qf
import torch
from quantfoundry.pipeline.journal import BlockRecord, Journal


def weight() -> torch.Tensor:
    return torch.randn(40, 512, generator=torch.Generator().manual_seed(0)) * 0.02


def test_the_journal_keeps_the_per_tensor_parameters(tmp_path) -> None:
    qw = qf.resolve_format("nf4-dq").quantize(weight())
    journal = Journal(tmp_path / "j", {"model": "x"})
    journal.start(fresh=True)
    journal.write_block(0, BlockRecord([("layers.0.q.weight", qw)]))
    back = journal.read_block(0).quantized()["layers.0.q.weight"]
    assert set(back.tensor_params) == {"offset", "nested_absmax", "nested_map"}
    for k, v in qw.tensor_params.items():
        assert torch.equal(back.tensor_params[k], v), k
    assert torch.equal(back.dequantize(), qw.dequantize()) and back.nbytes() == qw.nbytes()


def test_the_qf_artifact_stores_and_reloads_them(tiny_model, tmp_path) -> None:
    folder = tiny_model("llama", hidden_size=256, intermediate_size=512, head_dim=64)
    r = qf.run(str(folder), format="nf4-dq", out=tmp_path / "a", keep_model=True, progress=False, evaluators=[])
    name = "model.layers.0.mlp.down_proj"
    ours = r.model.get_submodule(name)
    assert set(dict(ours.named_buffers())) >= {"tensor_offset", "tensor_nested_absmax", "tensor_nested_map"}
    again = qf.load(tmp_path / "a").get_submodule(name).qweight
    assert torch.equal(again.tensor_params["nested_absmax"], ours.qweight.tensor_params["nested_absmax"])
    assert torch.equal(again.dequantize(), ours.qweight.dequantize())
    # the size report counts them once per tensor: the artifact's bits per weight are the format's
    w = r.model.get_submodule(name).qweight
    assert w.nbytes() == w.format.nbytes(w.shape)


def test_a_quant_linear_moves_them_with_its_weight() -> None:
    qw = qf.resolve_format("fp4-dq").quantize(weight())
    lin = qf.QuantLinear(qw, None, qf.get_component("kernel", "torch-dequant")())
    x = torch.randn(3, 512)
    ref = x @ qw.dequantize().T
    torch.testing.assert_close(lin(x), ref)
    lin = lin.to(torch.device("meta"))
    assert lin.qweight.tensor_params["offset"].device.type == "meta"

from __future__ import annotations

import importlib.metadata

import pytest
import quantfoundry as qf
import torch
from quantfoundry.plugins import QFPluginManager


def test_installed_plugin_is_found_through_its_entry_point() -> None:
    eps = [ep for ep in importlib.metadata.entry_points(group="quantfoundry") if ep.name == "mse-rtn"]
    assert eps, "pip install -e examples/qf-example-plugin first"
    pm = QFPluginManager().load()
    entry = pm.registry("quantizer").entry("mse-rtn")
    assert entry.distribution == "qf-example-plugin" and entry.version == "0.1.0"


@pytest.mark.parametrize("spec", ["int4-g32", "int3-g64-sym", "int2-g32", "int8"])
def test_never_worse_than_rtn_and_usually_better(spec: str) -> None:
    from qf_example_plugin import MSERTN

    fmt = qf.resolve_format(spec)
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) ** 3 * 0.02  # heavy tails
    ctx = qf.QuantContext(device=torch.device("cpu"))
    ours = MSERTN().quantize_tensor("w", w, fmt, ctx).dequantize()
    rtn = fmt.quantize(w).dequantize()
    e_ours = (ours - w).pow(2).sum()
    e_rtn = (rtn - w).pow(2).sum()
    assert e_ours <= e_rtn  # ratio 1 (plain RTN) is one of the candidates
    if fmt.options.bits <= 3:
        assert e_ours < 0.9 * e_rtn
    elif fmt.options.bits == 4:
        assert e_ours < 0.99 * e_rtn


def test_runs_end_to_end(tmp_path) -> None:
    result = qf.run(quantizer="mse-rtn", quantizer_options={"grid": "5"}, format="int3-g128",
                    evaluators=["size"], out=tmp_path / "o", progress=False)
    assert result.manifest["quantizer"] == [{"name": "mse-rtn", "options": {"grid": 5, "min_ratio": 0.7},
                                          "role": "quantizer"}]
    assert result.metrics["size"]["linear_bpw"]["quantized"] == pytest.approx(3 + 24 / 128)


def test_importance_weighs_the_error() -> None:
    """With an importance vector the search minimises the importance-weighted error (checked in
    float64 against plain RTN's), and reads ``ctx.importance`` so ``--imatrix`` is not wasted."""
    from qf_example_plugin import MSERTN

    fmt = qf.resolve_format("int3-g64-sym")
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(32, 256, generator=gen) ** 3 * 0.02
    imp = torch.rand(256, generator=gen) ** 4 * 10  # a few heavy columns
    ctx = qf.QuantContext(device=torch.device("cpu"))
    ctx.importance["w"] = imp
    ours = MSERTN().quantize_tensor("w", w, fmt, ctx).dequantize().double()
    assert ctx.importance.read
    rtn = fmt.quantize(w).dequantize().double()
    weighted = lambda q: ((q - w.double()).pow(2) * imp.double()).sum()  # noqa: E731
    assert weighted(ours) < 0.9 * weighted(rtn)

"""``hqq-lib``: the hqq library's own quantizer inside qf's pipeline — what it stores is hqq's
scale and zero point (in the format's storage dtypes) and the codes hqq's rounding gives on
them; it agrees with the native ``hqq`` (qf-hqq) as a cross-check; formats hqq cannot hold are
refused before any work; without the library, one line names the pip command."""

from __future__ import annotations

import hqq  # noqa: F401  the adapted library, a dependency: missing, the tests fail, never skip
import pytest
import quantfoundry as qf
import torch
from hqq.core.quantize import Quantizer
from quantfoundry.testing.conformance import QuantizerConformance

CPU = qf.QuantContext(device=torch.device("cpu"))


def trained_like(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w.view(-1)[torch.randint(0, w.numel(), (max(1, w.numel() // 100),), generator=g)] *= 15
    return w


def run(spec: str, w: torch.Tensor, name: str = "hqq-lib") -> qf.QuantizedWeight:
    return qf.get_component("quantizer", name)().quantize_tensor("w", w, qf.resolve_format(spec), CPU)


@pytest.mark.parametrize(("spec", "bits", "group"), [("int4-g64-zf16", 4, 64), ("int3-g128-zf16", 3, 128),
                                                     ("int2-g64-zf16", 2, 64)])
def test_the_stored_grid_is_the_librarys(spec: str, bits: int, group: int) -> None:
    w = trained_like(32, 256, seed=bits)
    qw = run(spec, w)
    _, meta = Quantizer.quantize(w, nbits=bits, channel_wise=True, group_size=group, optimize=True, round_zero=False,
                                 axis=1, bitpack=False, compute_dtype=torch.float32, device="cpu")
    scale = meta["scale"].reshape(32, -1).to(torch.float16)
    # the zero point that keeps hqq's offset (scale · zero) on the float16 scale
    zero = (meta["zero"] * meta["scale"]).reshape(32, -1).div(scale.float()).to(torch.float16)
    assert torch.equal(qw.params["scale"], scale) and torch.equal(qw.params["zero"], zero)
    # the codes: hqq's rounding, on the stored (float16) scale and zero
    s, z = scale.float().repeat_interleave(group, 1), zero.float().repeat_interleave(group, 1)
    want = torch.clamp(torch.round(w / s + z), 0, 2 ** bits - 1)
    assert torch.equal(qw.codes().float(), want)
    torch.testing.assert_close(qw.dequantize(), (want - z) * s)


def test_it_agrees_with_the_native_hqq() -> None:
    """The cross-check: hqq's own optimiser and qf-hqq's land at about the same error (they start
    from different grids: hqq's spans each group's min/max, qf's int format's includes 0)."""
    w = trained_like(128, 512, seed=3)
    err = {n: float((run("int4-g64-zf16", w, n).dequantize() - w).abs().mean()) for n in ("hqq-lib", "hqq")}
    rtn = float((qf.resolve_format("int4-g64-zf16").quantize(w).dequantize() - w).abs().mean())
    assert err["hqq-lib"] < rtn and err["hqq"] < rtn
    assert abs(err["hqq-lib"] - err["hqq"]) <= 0.03 * err["hqq"]


def test_formats_hqq_cannot_hold_are_refused_before_any_work() -> None:
    q = qf.get_component("quantizer", "hqq-lib")()
    assert "symmetric" in (q.check_format(qf.resolve_format("int4-g64-sym")) or "")
    assert "asymmetric integer grids" in (q.check_format(qf.resolve_format("int5-g64")) or "")
    assert q.check_format(qf.resolve_format("int4-g64")) is None


def test_a_missing_library_names_the_pip_command(monkeypatch) -> None:
    import builtins

    real = builtins.__import__

    def no_hqq(name, *args, **kwargs):
        if name.startswith("hqq"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_hqq)
    with pytest.raises(qf.QFError, match="pip install hqq"):
        qf.get_component("quantizer", "hqq-lib")().check_format(qf.resolve_format("int4-g64"))


class TestHQQLibConformance(QuantizerConformance):
    quantizer = "hqq-lib"
    format = "int4-g32-zf16"

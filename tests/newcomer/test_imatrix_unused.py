"""Issue 16.10: a quantizer that ignores the importance matrix is called out, not silently fed."""

from __future__ import annotations

import quantfoundry as qf
from quantfoundry.hookspecs import hookimpl


class _Ignores(qf.Quantizer):
    name = "ignores-importance"
    description = "RTN that never looks at ctx.importance (as the first tutorial's quantizer did)"
    scope = "tensor"

    def quantize_tensor(self, name, weight, fmt, ctx):  # noqa: ANN001, ANN201
        return fmt.quantize(weight.float())


class _Plugin:
    @hookimpl
    def qf_register_quantizers(self, register) -> None:  # noqa: ANN001
        register(_Ignores)


def test_an_unread_imatrix_is_reported(register_plugin, tiny_model) -> None:
    register_plugin(_Plugin(), "ignores-importance-test")
    result = qf.run(tiny_model("llama"), quantizer="ignores-importance", imatrix=True, evaluators=[], out=None,
                    progress=False, calibrator_options={"n_samples": 2, "seq_len": 32})
    assert any(n.startswith("--imatrix collected an importance matrix, but 'ignores-importance' never read it")
               for n in result.notes), result.notes


def test_a_quantizer_that_reads_it_is_not_reported(tiny_model) -> None:
    result = qf.run(tiny_model("llama"), quantizer="rtn", imatrix=True, evaluators=[], out=None, progress=False,
                    calibrator_options={"n_samples": 2, "seq_len": 32})
    assert not [n for n in result.notes if "never read it" in n], result.notes

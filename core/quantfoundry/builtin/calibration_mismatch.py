"""Built-in evaluator ``calibration-mismatch``: damage inside and outside the calibration domain.

Calibrating a code model on WikiText (or a medical model on code) tunes the quantizer to the
wrong activations. Given one evaluation text from the calibration domain (``in_domain``,
held out from the calibration text) and one from outside it (``out_domain``), this reports,
for each, the perplexity increase and the KL/top-1 figures of ``kl``, and the ratio of the
two KL means. A ratio well above 1 says the quantized model lost more outside the domain
it was calibrated on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ..data import default_eval_text
from ..evaluation.windows import TextOptions
from ..hookspecs import hookimpl
from ..roles.evaluator import EvalTarget, Evaluator, Metric
from .kl import compare_on_text


@dataclass(frozen=True, kw_only=True)
class CalibrationMismatchOptions(TextOptions):
    in_domain: Path | None = field(default=None, metadata={
        "help": "held-out text of the calibration domain (default: the embedded Python-code evaluation text)"})
    out_domain: Path | None = field(default=None, metadata={"help": "text from outside the calibration domain (required)"})
    top_k: int = field(default=256, metadata={"help": "original log-probs kept per position (0 = all)"})
    warn_ratio: float = field(default=2.0, metadata={
        "help": "flag when the out-of-domain KL mean exceeds the in-domain one by this factor"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.out_domain is None:
            raise ValueError("out_domain is required: pass a text from outside the calibration domain, "
                             "e.g. --evaluator-opt calibration-mismatch.out_domain=wiki.test.raw")
        if self.path is not None:
            raise ValueError("use in_domain and out_domain instead of path")


class CalibrationMismatchEvaluator(Evaluator):
    name = "calibration-mismatch"
    description = "perplexity increase and KL inside vs outside the calibration domain"
    Options = CalibrationMismatchOptions
    compares = True
    higher_is_better = {"in_ppl_increase_pct": False, "out_ppl_increase_pct": False, "in_kl_mean": False,
                        "out_kl_mean": False, "in_same_top1_pct": True, "out_same_top1_pct": True,
                        "out_in_kl_ratio": False}

    options: CalibrationMismatchOptions

    def evaluate(self, target: EvalTarget) -> dict[str, Metric]:
        o = self.options
        out: dict[str, Metric] = {}
        calib = (target.info.get("calibration") or {}).get("source")
        # in-domain by default: the held-out text of the default calibration text's domain (Python
        # code), whatever the model — not the general-English default of the other text evaluators
        for side, path in (("in", o.in_domain or default_eval_text()), ("out", o.out_domain)):
            shared = {f.name: getattr(o, f.name) for f in dataclasses.fields(TextOptions)}
            text_opts = TextOptions(**{**shared, "path": path})
            r = compare_on_text(target, text_opts, o.top_k)
            out[f"{side}_text"] = r["text"]
            out[f"{side}_ppl_original"] = r["ppl_original"]
            out[f"{side}_ppl_quantized"] = r["ppl_quantized"]
            out[f"{side}_ppl_increase_pct"] = 100.0 * (float(r["ppl_ratio"]) - 1.0)
            out[f"{side}_kl_mean"] = r["kl_mean"]
            out[f"{side}_same_top1_pct"] = r["same_top1_pct"]
        ratio = float(out["out_kl_mean"]) / max(float(out["in_kl_mean"]), 1e-12)
        out["out_in_kl_ratio"] = ratio
        out["calibration_text"] = Path(calib).name if calib else "none (the quantizer used no calibration)"
        out["verdict"] = (f"out-of-domain damage {ratio:.1f}x the in-domain one: calibrate on text like "
                          f"{out['out_text']} for that use" if ratio >= o.warn_ratio else
                          f"out-of-domain damage {ratio:.1f}x the in-domain one (below {o.warn_ratio:g}x)")
        return out


@hookimpl
def qf_register_evaluators(register):
    register(CalibrationMismatchEvaluator)

"""Built-in evaluator ``perplexity``, under the core or the llama.cpp protocol.

Both protocols are defined in :mod:`quantfoundry.evaluation.windows` and ``docs/perplexity.md``.
Logits are reduced in float32 on row chunks of at most 16 MiB (NLL summed in float64);
perplexity = exp(total NLL / scored tokens). With pycode-7m (context 1024) the core protocol over
50,000 tokens scores 48 windows of 1024 and one of 848: 49,951 tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..evaluation.windows import TextOptions, Windows, make_windows, row_chunks, scored_logits
from ..hookspecs import hookimpl
from ..roles.evaluator import EvalTarget, Evaluator, Metric


@dataclass(frozen=True, kw_only=True)
class PerplexityOptions(TextOptions):
    """Options of ``perplexity``: the text and the protocol (see ``TextOptions``)."""


@torch.no_grad()
def total_nll(target: EvalTarget, wins: Windows, batch_size: int) -> tuple[float, int]:
    """Sum of negative log-likelihoods over the scored positions, and their count."""
    total, count = 0.0, 0
    for logits, tgt in scored_logits(target, wins, batch_size):
        for rows, t in row_chunks(logits, tgt, 4):
            total += float(F.cross_entropy(rows, t, reduction="sum").double())
        count += tgt.numel()
    return total, count


def text_metrics(wins: Windows) -> dict[str, Metric]:
    """What identifies the scored text (recorded beside every text metric)."""
    return {"text": wins.text_name, "text_sha256": wins.text_sha256[:16], "protocol": wins.protocol,
            "ctx": wins.ctx}


class PerplexityEvaluator(Evaluator):
    name = "perplexity"
    description = "perplexity: core protocol (windows from their start, no BOS) or protocol=llama.cpp"
    Options = PerplexityOptions
    higher_is_better = {"perplexity": False, "nll": False}
    agreement = {"perplexity": (0.01, 0.0)}

    options: PerplexityOptions

    def evaluate(self, target: EvalTarget) -> dict[str, Metric]:
        wins = make_windows(self.options, target)
        nll, n = total_nll(target, wins, self.options.batch_size)
        return {"perplexity": math.exp(nll / n), "nll": nll / n, "tokens": n, **text_metrics(wins)}


@hookimpl
def qf_register_evaluators(register):
    register(PerplexityEvaluator)

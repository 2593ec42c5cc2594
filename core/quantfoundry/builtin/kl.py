"""Built-in evaluator ``kl``: KL(original ‖ quantized) per token and top-1 flips.

For every scored position (same windows and protocols as ``perplexity``) the original's
next-token distribution P and the quantized model's Q give ``KL(P‖Q) = Σ P log(P/Q)``. The
evaluator reports its mean, median, 99th percentile and maximum over positions, the
fraction of positions whose argmax token differs (``flip_rate``; ``same_top1_pct`` as
``llama-perplexity --kl-divergence`` prints "Same top p"), and both perplexities on the same
positions.

The original's side is computed once per (model, text, protocol, options) and cached on
disk by :class:`~quantfoundry.evaluation.reference.Reference`:

* ``top_k=0``: the full float32 logits (exact; ``positions × vocab × 4`` bytes);
* ``top_k=K`` (default 256): the K largest logits with their token ids, the float64
  log-sum-exp and the log of the remaining mass (``positions × (8K + 24)`` bytes). The tail enters as one bucket, ``P_tail log(P_tail/Q_tail)``,
  which by the log-sum inequality never exceeds the exact tail term, so the result is a
  lower bound of the exact KL; the gap is at most the tail's own KL and is reported
  through ``tail_mass_mean`` (the mean probability outside the top K).

All softmax and KL arithmetic runs in float64 on row chunks of at most 16 MiB per
``[rows, vocab]`` temporary, into per-position tensors allocated once: besides the models,
memory is the reference's size, one batch of logits and a few chunks, whatever the vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import UsageError
from ..evaluation.windows import TextOptions, Windows, make_windows, row_chunks, scored_logits
from ..hookspecs import hookimpl
from ..roles.evaluator import EvalTarget, Evaluator, Metric
from .perplexity import text_metrics


@dataclass(frozen=True, kw_only=True)
class KLOptions(TextOptions):
    top_k: int = field(default=256, metadata={
        "help": "original log-probs kept per position (0 = the whole vocabulary, exact)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


def _logprobs(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 log-probabilities and log-sum-exp of float32 logits (one formula for both sides)."""
    x = logits.double()
    lse = x.logsumexp(-1, keepdim=True)
    return x - lse, lse[:, 0]


@torch.no_grad()
def reference_logprobs(original: EvalTarget, wins: Windows, batch_size: int, top_k: int) -> dict[str, torch.Tensor]:
    """The original's side of the comparison, position by position (cached on disk).

    Logits are kept as the model's float32 values (lossless) with a float64 log-sum-exp, so
    the log-probabilities rebuilt from the cache are bit-identical to a fresh computation.
    Each result is one CPU tensor of ``wins.scored`` rows, allocated at the first chunk and
    filled in place (per-chunk pieces kept until a final ``torch.cat`` would double the peak and
    pin glibc's heap between the float64 temporaries, which then never return to the system).
    """
    n = wins.scored
    out: dict[str, torch.Tensor] = {}
    pos = 0
    for logits, tgt in scored_logits(original, wins, batch_size):
        for rows, t in row_chunks(logits, tgt, 8):
            logp, lse = _logprobs(rows)
            part = {"nll": -logp.gather(1, t[:, None])[:, 0], "lse": lse}
            if top_k and top_k < logp.shape[1]:
                idx = rows.topk(top_k, dim=-1).indices
                part["topk_logit"], part["topk_idx"] = rows.gather(1, idx), idx.int()
                part["tail_logp"] = logp.scatter(1, idx, -math.inf).logsumexp(-1)
            else:
                part["logits"] = rows
            if not out:
                out = {k: torch.empty((n, *v.shape[1:]), dtype=v.dtype) for k, v in part.items()}
            for k, v in part.items():
                out[k][pos: pos + v.shape[0]] = v
            pos += rows.shape[0]
    if pos != n:
        raise RuntimeError(f"scored {pos} positions, the windows say {n}")
    return out


def _plogp_diff(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """Σ exp(lp) (lp − lq) over the last dim, with 0 · log 0 = 0."""
    term = torch.exp(lp) * (lp - lq)
    return torch.where(torch.isneginf(lp), torch.zeros_like(term), term).sum(-1)


@torch.no_grad()
def kl_against(target: EvalTarget, wins: Windows, ref: dict[str, torch.Tensor], batch_size: int) -> dict[str, torch.Tensor]:
    """Per-position KL(P‖Q), flips, NLLs and tail mass of ``target`` against ``ref``."""
    exact = "logits" in ref
    n = ref["nll"].numel()
    kl = torch.empty(n, dtype=torch.float64)
    flip = torch.empty(n, dtype=torch.bool)
    nll = torch.empty(n, dtype=torch.float64)
    tail = torch.zeros(n, dtype=torch.float64)
    pos = 0
    for logits, tgt in scored_logits(target, wins, batch_size):
        for rows, t in row_chunks(logits, tgt, 8):
            m = rows.shape[0]
            if pos + m > n:
                raise UsageError("the cached reference has fewer positions than the text; "
                                 "clear the cache ($QF_CACHE_DIR) and re-run")
            sl = slice(pos, pos + m)
            lq, _ = _logprobs(rows)
            dev = lq.device
            nll[sl] = -lq.gather(1, t[:, None])[:, 0].cpu()
            top1_q = lq.argmax(-1)
            if exact:
                lp, _ = _logprobs(ref["logits"][sl].to(dev))
                kl[sl] = _plogp_diff(lp, lq).cpu()
                flip[sl] = (top1_q != lp.argmax(-1)).cpu()
            else:
                idx = ref["topk_idx"][sl].to(dev).long()
                lp_top = ref["topk_logit"][sl].to(dev, torch.float64) - ref["lse"][sl].to(dev)[:, None]
                lp_tail = ref["tail_logp"][sl].to(dev, torch.float64)
                lq_top = lq.gather(1, idx)
                lq_tail = lq.scatter(1, idx, -math.inf).logsumexp(-1)
                kl[sl] = (_plogp_diff(lp_top, lq_top) + _plogp_diff(lp_tail[:, None], lq_tail[:, None])).cpu()
                flip[sl] = (top1_q != idx[:, 0]).cpu()
                tail[sl] = torch.exp(lp_tail).cpu()
            pos += m
    if pos != n:
        raise UsageError("the cached reference does not match the text's positions; "
                         "clear the cache ($QF_CACHE_DIR) and re-run")
    return {"kl": kl.clamp_min(0.0), "flip": flip, "nll": nll, "tail": tail}


def _quantile(x: torch.Tensor, q: float) -> float:
    """Linear-interpolated quantile (as numpy's default and llama-perplexity's percentiles)."""
    v = x.sort().values
    p = q * (v.numel() - 1)
    lo = int(p)
    hi = min(lo + 1, v.numel() - 1)
    return float(v[lo] + (p - lo) * (v[hi] - v[lo]))


def kl_summary(per: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, Metric]:
    """Mean/median/p99/max KL, flips and both perplexities over the positions."""
    kl = per["kl"]
    nll_q = float(per["nll"].mean())
    nll_p = float(ref["nll"].double().mean())
    flip = float(per["flip"].double().mean())
    return {
        "kl_mean": float(kl.mean()),
        "kl_median": _quantile(kl, 0.5),
        "kl_p99": _quantile(kl, 0.99),
        "kl_max": float(kl.max()),
        "flip_rate": flip,
        "same_top1_pct": 100.0 * (1.0 - flip),
        "ppl_original": math.exp(nll_p),
        "ppl_quantized": math.exp(nll_q),
        "ppl_ratio": math.exp(nll_q - nll_p),
        "tail_mass_mean": float(per["tail"].mean()),
        "tokens": int(kl.numel()),
    }


def compare_on_text(target: EvalTarget, options: TextOptions, top_k: int) -> dict[str, Metric]:
    """KL of ``target`` against its reference on ``options.path`` (the reference cached)."""
    if target.reference is None:
        raise UsageError("kl compares against the original model, but none was given; "
                         "run it through `qf run` or `qf eval`")
    wins = make_windows(options, target)
    key = {"what": "kl-reference", "top_k": top_k, **wins.key(), "device": target.device.type,
           "max_tokens": options.max_tokens}
    ref = target.reference.tensors("kl", key, lambda orig: reference_logprobs(orig, wins, options.batch_size, top_k))
    per = kl_against(target, wins, ref, options.batch_size)
    return {**kl_summary(per, ref), "top_k": top_k, **text_metrics(wins)}


class KLEvaluator(Evaluator):
    name = "kl"
    description = "KL(original || quantized) per token (mean/median/p99/max) and top-1 flips, as llama.cpp's KLD"
    Options = KLOptions
    compares = True
    higher_is_better = {"kl_mean": False, "kl_median": False, "kl_p99": False, "kl_max": False,
                        "flip_rate": False, "same_top1_pct": True, "ppl_quantized": False, "ppl_ratio": False}
    agreement = {"kl_mean": (0.1, 0.002), "same_top1_pct": (0.0, 1.0)}

    options: KLOptions

    def evaluate(self, target: EvalTarget) -> dict[str, Metric]:
        return compare_on_text(target, self.options, self.options.top_k)


@hookimpl
def qf_register_evaluators(register):
    register(KLEvaluator)

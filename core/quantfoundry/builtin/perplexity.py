"""Built-in evaluator ``perplexity`` — the core protocol, so figures are comparable.

1. The text is tokenized **without special tokens** (no BOS/EOS added).
2. Its first ``max_tokens`` tokens (default 50,000) are cut into **non-overlapping windows**
   of ``window`` tokens (default ``min(model context, 2048)``); the last window may be
   shorter (it is scored if it has at least 2 tokens).
3. Each window is scored **from its own start, with no BOS**: every token but the window's
   first is predicted from the tokens before it in the same window.
4. Logits are computed and reduced in **float32**; perplexity = exp(total NLL / scored tokens).

With the default 1024-token context of pycode-7m, 50,000 tokens give 48 windows of 1024 and
one of 848: 49,951 scored tokens.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import default_eval_text
from ..hookspecs import hookimpl
from ..options import Options
from ..roles.evaluator import EvalTarget, Evaluator, Metric
from .text_calibrator import read_text


@dataclass(frozen=True, kw_only=True)
class PerplexityOptions(Options):
    path: Path | None = field(default=None, metadata={
        "help": "evaluation text (.txt/.jsonl); default: the embedded Python-code evaluation text"})
    window: int = field(default=0, metadata={"help": "tokens per window; 0 = min(model context, 2048)"})
    max_tokens: int = field(default=50_000, metadata={"help": "score only the first max_tokens tokens"})
    batch_size: int = field(default=4, metadata={"help": "windows per forward pass"})

    def __post_init__(self) -> None:
        if self.window < 0 or self.window == 1:
            raise ValueError(f"window must be 0 (auto) or >= 2, got {self.window}")
        if self.max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2, got {self.max_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def windows_of(ids: torch.Tensor, window: int) -> list[torch.Tensor]:
    """Non-overlapping windows; a final window shorter than 2 tokens is dropped."""
    return [w for w in ids.split(window) if w.numel() >= 2]


@torch.no_grad()
def window_nll(model: torch.nn.Module, windows: list[torch.Tensor], device: torch.device,
               batch_size: int) -> tuple[float, int]:
    """Sum of float32 negative log-likelihoods over every window, and the scored-token count."""
    total, count = 0.0, 0
    i = 0
    while i < len(windows):
        batch = [windows[i]]
        while len(batch) < batch_size and i + len(batch) < len(windows) and \
                windows[i + len(batch)].numel() == windows[i].numel():
            batch.append(windows[i + len(batch)])
        i += len(batch)
        x = torch.stack(batch).to(device)
        logits = model(input_ids=x, use_cache=False).logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                              reduction="sum")
        total += float(nll.double())
        count += x[:, 1:].numel()
    return total, count


class PerplexityEvaluator(Evaluator):
    name = "perplexity"
    description = "perplexity over non-overlapping windows, no BOS, float32 (docs/perplexity.md)"
    Options = PerplexityOptions
    higher_is_better = {"perplexity": False, "nll": False, "tokens": True}

    options: PerplexityOptions

    def evaluate(self, target: EvalTarget) -> dict[str, Metric]:
        o = self.options
        path = o.path or default_eval_text()
        text = read_text(path)
        ids = target.tokenizer(text, add_special_tokens=False, return_tensors="pt", verbose=False).input_ids[0][: o.max_tokens]
        window = o.window or min(target.source.context_length, 2048)
        wins = windows_of(ids, window)
        if not wins:
            from ..errors import UsageError
            raise UsageError(f"evaluation text {path} has fewer than 2 tokens; pass a longer text")
        nll, n = window_nll(target.model, wins, target.device, o.batch_size)
        return {
            "perplexity": math.exp(nll / n),
            "nll": nll / n,
            "tokens": n,
            "text": Path(path).name,
            "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()[:16],
            "window": window,
        }


@hookimpl
def qf_register_evaluators(register):
    register(PerplexityEvaluator)

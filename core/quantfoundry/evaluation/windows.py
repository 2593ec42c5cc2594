"""Evaluation windows: how a text is cut and which positions are scored (two protocols).

``core`` (``docs/perplexity.md``): the text is tokenized without special tokens, its first
``max_tokens`` tokens are cut into non-overlapping windows of ``ctx`` tokens (the last may be
shorter), each scored from its own start without BOS: every token but a window's first is
predicted.

``llama.cpp`` (``llama-perplexity``): the text is tokenized with the BOS the model adds, cut
into ``len // ctx`` whole windows (at most ``max_tokens // ctx``); each window's first token is
replaced by BOS when the model adds one; only the second half is scored: logits at
positions ``ctx//2 … ctx-2`` predict tokens ``ctx//2+1 … ctx-1``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..data import default_eval_text, english_eval_text, is_default_model
from ..errors import UsageError
from ..options import Options
from ..roles.evaluator import EvalTarget

Protocol = Literal["core", "llama.cpp"]

#: bytes of one ``[rows, vocab]`` temporary when scored logits are reduced in row chunks
CHUNK_BYTES = 16 << 20


@dataclass(frozen=True, kw_only=True)
class TextOptions(Options):
    """Options shared by every evaluator that scores a text (perplexity, kl, ...)."""

    path: Path | None = field(default=None, metadata={
        "help": "evaluation text (.txt/.jsonl); default: the embedded Python-code text for the default model "
                "(pycode-7m), a general-English text (WikiText-2 test excerpt) for any other"})
    protocol: Protocol = field(default="core", metadata={
        "help": "core: non-overlapping windows from their start, no BOS; llama.cpp: as llama-perplexity "
                "(BOS first, second half of each window scored)"})
    ctx: int = field(default=0, metadata={
        "help": "tokens per window; 0 = min(model context, 2048) for core, 512 for llama.cpp"})
    max_tokens: int = field(default=50_000, metadata={"help": "use only the first max_tokens tokens"})
    batch_size: int = field(default=4, metadata={"help": "windows per forward pass"})
    add_bos: bool | None = field(default=None, metadata={
        "help": "llama.cpp protocol: put BOS first (default: if the tokenizer adds one)"})

    def text_path(self, source: Any = None) -> Path:
        """The evaluation text: ``path``, else the embedded default for ``source``'s model: the
        Python-code text for pycode-7m (or no source), the general-English text for any other."""
        if self.path is not None:
            return Path(self.path)
        if source is None or is_default_model(source.path):
            return default_eval_text()
        return english_eval_text()

    def __post_init__(self) -> None:
        if self.ctx < 0 or self.ctx == 1:
            raise ValueError(f"ctx must be 0 (auto) or >= 2, got {self.ctx}")
        if self.protocol == "llama.cpp" and 0 < self.ctx < 4:
            raise ValueError(f"the llama.cpp protocol needs ctx >= 4, got {self.ctx}")
        if self.max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2, got {self.max_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass
class Windows:
    """Token windows of one text and the positions scored in each."""

    windows: list[torch.Tensor]
    score_from: int  # logits at positions >= score_from (and < len-1) are scored
    protocol: str
    ctx: int
    text_name: str
    text_sha256: str
    add_bos: bool = False
    describe: dict[str, Any] = field(default_factory=dict)

    @property
    def scored(self) -> int:
        return sum(max(0, w.numel() - 1 - self.score_from) for w in self.windows)

    def key(self) -> dict[str, Any]:
        """What identifies the scored positions (for caches)."""
        return {"protocol": self.protocol, "ctx": self.ctx, "text_sha256": self.text_sha256,
                "add_bos": self.add_bos, "windows": len(self.windows), "scored": self.scored}

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Stacks of up to ``batch_size`` equal-length windows, in order."""
        i = 0
        while i < len(self.windows):
            n = 1
            while n < batch_size and i + n < len(self.windows) and \
                    self.windows[i + n].numel() == self.windows[i].numel():
                n += 1
            yield torch.stack(self.windows[i: i + n])
            i += n


def _tokenizer_adds_bos(tokenizer: Any) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True).input_ids
    return bool(ids) and ids[0] == bos


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def make_windows(options: TextOptions, target: EvalTarget) -> Windows:
    """Read and tokenize the text and cut it into windows under ``options.protocol``."""
    from ..builtin.text_calibrator import read_text

    path = options.text_path(target.source)
    text = read_text(path)
    tok = target.tokenizer
    sha = text_sha256(text)
    if options.protocol == "core":
        ctx = options.ctx or min(target.source.context_length, 2048)
        ids = tok(text, add_special_tokens=False, return_tensors="pt", verbose=False).input_ids[0][: options.max_tokens]
        wins = [w for w in ids.split(ctx) if w.numel() >= 2]
        if not wins:
            raise UsageError(f"evaluation text {path} has fewer than 2 tokens; pass a longer text")
        return Windows(wins, 0, "core", ctx, _text_name(path), sha)
    ctx = options.ctx or 512
    add_bos = _tokenizer_adds_bos(tok) if options.add_bos is None else options.add_bos
    bos = getattr(tok, "bos_token_id", None)
    if add_bos and bos is None:
        raise UsageError("add_bos=true, but the tokenizer has no BOS token; drop add_bos")
    body = tok(text, add_special_tokens=False, return_tensors="pt", verbose=False).input_ids[0]
    ids = torch.cat([torch.tensor([bos], dtype=body.dtype), body]) if add_bos else body
    n = min(ids.numel() // ctx, options.max_tokens // ctx)
    if ids.numel() < 2 * ctx or n < 1:
        raise UsageError(f"the llama.cpp protocol needs at least {2 * ctx} tokens with ctx={ctx}; "
                         f"{path.name} has {ids.numel()}: pass a longer text or a smaller ctx")
    wins = [w.clone() for w in ids[: n * ctx].view(n, ctx)]
    if add_bos:
        for w in wins:
            w[0] = bos
    return Windows(wins, ctx // 2, "llama.cpp", ctx, _text_name(path), sha, add_bos=add_bos)


def _text_name(path: Path) -> str:
    if path == default_eval_text():
        return f"{path.name} (embedded, Python code)"
    if path == english_eval_text():
        return f"{path.name} (embedded, WikiText-2 English)"
    return path.name


def default_text_warning(evaluators: list[Any], source: Any) -> str | None:
    """A warning when an evaluator scores the embedded English text because the model is not
    the default one and no text was passed (None otherwise)."""
    names = [ev.name for ev in evaluators if isinstance(getattr(ev, "options", None), TextOptions)
             and ev.options.path is None]
    if not names or is_default_model(source.path):
        return None
    return (f"{', '.join(dict.fromkeys(names))} scored the embedded general-English text (a WikiText-2 excerpt); "
            "for figures that speak for your model's traffic pass a text like it: --evaluator-opt path=FILE")


def scored_logits(target: EvalTarget, wins: Windows, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per window: float32 logits of its scored positions ``[n, vocab]`` and the tokens they predict.

    Windows run through the model ``batch_size`` at a time. A window's logits are a view of the
    batch's, except the last window's, a copy: the batch's logits are then freed before the next
    forward even while the caller still holds that window (one batch of logits and one window's
    copy are alive at a time, where ``logits[:, s:-1]`` of the whole batch was a second batch).
    Shows a progress bar when ``target.info["progress"]`` is true (``qf run`` on a terminal).
    """
    from ..progress import Progress

    s = wins.score_from
    batches = list(wins.batches(batch_size))
    label = f"scoring {wins.text_name} ({target.label})"
    with Progress(enabled=bool(target.info.get("progress")), total=len(batches), label=label, unit="batches",
                  transient=True) as bar:
        for x in batches:
            logits = target.logits(x)
            tgt = x[:, s + 1:].to(logits.device)
            last = x.shape[0] - 1
            for i in range(last + 1):
                yield (logits[i, s:-1].clone() if i == last else logits[i, s:-1]), tgt[i]
            del logits, tgt
            bar.advance()


def row_chunks(logits: torch.Tensor, tgt: torch.Tensor, itemsize: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Row chunks of one window's logits and targets, sized so that a ``[rows, vocab]``
    temporary of ``itemsize``-byte values takes at most :data:`CHUNK_BYTES`."""
    rows = max(1, CHUNK_BYTES // (itemsize * logits.shape[-1]))
    return zip(logits.split(rows), tgt.split(rows), strict=True)

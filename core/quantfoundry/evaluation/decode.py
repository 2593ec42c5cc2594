"""Timed greedy decoding of a causal LM, the way deployment engines run it.

Three modes, all greedy, all one token per sequence per step:

* ``eager``: transformers' dynamic KV cache, one Python-driven forward per step. On a GPU at
  batch 1 this measures mostly Python and kernel-launch overhead, not the kernels.
* ``static``: a preallocated :class:`transformers.StaticCache` of fixed length, the step's
  inputs (token, position) held in fixed tensors updated in place; still eager.
* ``graph`` (CUDA only): the ``static`` step captured once in a CUDA graph and replayed, so the
  figure is the kernels' time — what vLLM/TGI's CUDA-graph decode and ``torch.compile``'s
  "reduce-overhead" mode see. Needs every kernel to be capture-safe (no host syncs); when
  capture fails the step runs as ``static`` and the returned note says why.

:func:`time_decode` returns tokens per second of the decode steps alone (the prefill that fills
the cache is not timed) and a note naming the mode that actually ran.
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

DECODE_MODES = ("auto", "eager", "static", "graph")


@dataclass(frozen=True)
class DecodeTiming:
    tokens_per_s: float  # tokens of all sequences per second of decode steps
    mode: str  # the mode that ran: "eager", "static", "graph", or "static (graph capture failed: …)"
    tokens: torch.Tensor  # [batch, steps] greedy tokens of the last timed run (for checks)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_kwargs(model: torch.nn.Module) -> tuple[str, bool]:
    """(name of the forward's KV-cache argument, whether it takes ``cache_position``): transformers
    renamed ``past_key_values`` to ``cache`` and dropped ``cache_position`` in 5.2x."""
    params = inspect.signature(model.forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), "cache_position" in params


def _out_cache(out: object) -> object:
    return getattr(out, "cache", None) or out.past_key_values  # type: ignore[attr-defined]


def resolve_mode(mode: str, device: torch.device) -> str:
    if mode not in DECODE_MODES:
        raise ValueError(f"decode mode must be one of {', '.join(DECODE_MODES)}, got {mode!r}")
    if mode == "auto":
        return "graph" if device.type == "cuda" else "eager"
    return mode


@torch.no_grad()
def _eager_run(model: torch.nn.Module, prompt: torch.Tensor, steps: int) -> tuple[float, torch.Tensor]:
    kw, _ = _cache_kwargs(model)
    out = model(input_ids=prompt, use_cache=True)
    cache = _out_cache(out)
    nxt = out.logits[:, -1:].argmax(-1)
    toks = []
    _sync(prompt.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        toks.append(nxt)
        out = model(input_ids=nxt, use_cache=True, **{kw: cache})
        cache = _out_cache(out)
        nxt = out.logits[:, -1:].argmax(-1)
    _sync(prompt.device)
    return time.perf_counter() - t0, torch.cat(toks, 1)


class _StaticDecoder:
    """A decode step over a static cache with fixed input tensors (capturable in a CUDA graph)."""

    def __init__(self, model: torch.nn.Module, prompt: torch.Tensor, steps: int):
        from transformers import StaticCache

        self.model, self.prompt, self.steps = model, prompt, steps
        dev = prompt.device
        self.cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + steps + 1)
        self.tok = torch.zeros(prompt.shape[0], 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.logits: torch.Tensor | None = None
        self.kw, self.takes_cache_position = _cache_kwargs(model)
        self.run: Callable[[], None] = self._step

    @torch.no_grad()
    def _step(self) -> None:
        self.logits = self.model(input_ids=self.tok, use_cache=True, **self._where(self.pos)).logits

    def _where(self, positions: torch.Tensor) -> dict[str, object]:
        # explicit positions (device tensors): nothing reads the cache's length on the host
        kw: dict[str, object] = {self.kw: self.cache, "position_ids": positions.view(1, -1)}
        if self.takes_cache_position:
            kw["cache_position"] = positions
        return kw

    @torch.no_grad()
    def prefill(self) -> None:
        self.cache.reset()
        n = self.prompt.shape[1]
        out = self.model(input_ids=self.prompt, use_cache=True,
                         **self._where(torch.arange(n, device=self.prompt.device)))
        self.tok.copy_(out.logits[:, -1:].argmax(-1))
        self.pos.fill_(n)

    def capture(self) -> None:
        """Capture the step in a CUDA graph (after warm-up steps on a side stream, as torch asks)."""
        self.prefill()
        side = torch.cuda.Stream(self.prompt.device)
        side.wait_stream(torch.cuda.current_stream(self.prompt.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self._step()
        torch.cuda.current_stream(self.prompt.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step()
        self.graph = graph
        self.run = graph.replay

    def _logits(self) -> torch.Tensor:
        if self.logits is None:
            raise RuntimeError("decode step produced no logits")
        return self.logits

    @torch.no_grad()
    def timed(self) -> tuple[float, torch.Tensor]:
        self.prefill()
        toks = torch.empty(self.prompt.shape[0], self.steps, dtype=torch.long, device=self.prompt.device)
        _sync(self.prompt.device)
        t0 = time.perf_counter()
        for i in range(self.steps):
            toks[:, i:i + 1] = self.tok
            self.run()
            self.tok.copy_(self._logits()[:, -1:].argmax(-1))
            self.pos.add_(1)
        _sync(self.prompt.device)
        return time.perf_counter() - t0, toks


def time_decode(model: torch.nn.Module, prompt: torch.Tensor, steps: int, *, mode: str = "auto",
                repeats: int = 3, warmup: int = 1) -> DecodeTiming:
    """Median tokens/s of ``steps`` greedy decode steps after ``prompt`` ([batch, tokens], on the
    model's device), over ``repeats`` timed runs after ``warmup`` untimed ones."""
    dev = prompt.device
    mode = resolve_mode(mode, dev)
    if mode == "graph" and dev.type != "cuda":
        raise ValueError("decode mode 'graph' needs a CUDA device (CUDA graphs); use 'static' or 'eager'")
    ran = mode
    if mode == "eager":
        def once() -> tuple[float, torch.Tensor]:
            return _eager_run(model, prompt, steps)
    else:
        dec = _StaticDecoder(model, prompt, steps)
        if mode == "graph":
            try:
                dec.capture()
            except Exception as e:  # noqa: BLE001 - a kernel that is not capture-safe: say so, run eagerly
                _sync(dev)
                dec = _StaticDecoder(model, prompt, steps)
                ran = f"static (graph capture failed: {type(e).__name__}: {str(e).splitlines()[0][:100]})"
        once = dec.timed
    for _ in range(warmup):
        once()
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    times = []
    for _ in range(repeats):
        t, toks = once()
        times.append(t)
    return DecodeTiming(prompt.shape[0] * steps / statistics.median(times), ran, toks)

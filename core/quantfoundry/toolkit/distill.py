"""Training a model towards a reference model's next-token distributions (distillation), for
quantization-aware training and end-to-end fine-tuning of quantized models.

:func:`distill` runs AdamW over the given parameters with a linear warm-up and a cosine decay,
gradient accumulation over micro-batches of token sequences, and the loss
:func:`kl_to_reference` — the mean ``KL(p_reference ‖ p_model)`` per token, the reference run
alongside each micro-batch (no logits stored). A held-out share of the sequences is measured
before training, every ``eval_every`` steps and at the end; the parameters are left at the best
measured state (the untouched one included). The order of the sequences is a function of the
seed and the step alone, so a run resumed from its checkpoint (written atomically every
``checkpoint_every`` steps: parameters, optimiser, schedule, losses, best state) follows the same
trajectory as one never stopped.

For memory on a GPU: ``autocast`` runs both models' forward passes under
``torch.autocast(dtype=bfloat16)`` (the loss and the optimiser stay float32), and
``checkpointed`` modules (a model's decoder blocks) keep no activations in the forward pass —
each recomputes its own in the backward pass (``torch.utils.checkpoint``, non-reentrant).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn


@dataclass(frozen=True)
class DistillSettings:
    steps: int                    # optimiser steps
    lr: float
    weight_decay: float = 0.0
    warmup: int = 0               # steps of linear warm-up, then a cosine decay to 0
    batch: int = 1                # sequences per micro-batch
    accumulate: int = 1           # micro-batches per step
    held_out: float = 0.1         # share of the sequences measured, not trained on (at least one when > 0)
    eval_every: int = 0           # steps between held-out measurements (0: only before and at the end)
    seed: int = 0
    checkpoint: Path | None = None
    checkpoint_every: int = 0     # steps between checkpoints (0: none)
    autocast: bool = False        # forward passes in bfloat16 autocast (CUDA)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch < 1 or self.accumulate < 1:
            raise ValueError("steps, batch and accumulate must be at least 1")
        if not self.lr > 0:
            raise ValueError(f"the learning rate must be positive, got {self.lr}")
        if not 0 <= self.held_out < 1:
            raise ValueError(f"held_out is a share of the sequences in [0, 1), got {self.held_out}")
        if self.checkpoint_every and self.checkpoint is None:
            raise ValueError("checkpoint_every needs a checkpoint path")


@dataclass
class DistillResult:
    losses: list[float] = field(default_factory=list)           # training loss per step
    held: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out loss), step 0 before training
    best_step: int = 0
    resumed_from: int = 0

    @property
    def before(self) -> float:
        return self.held[0][1]

    @property
    def best(self) -> float:
        return min(v for _, v in self.held)


def kl_to_reference(model: nn.Module, reference: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ``KL(p_reference ‖ p_model)`` for the sequences ``ids`` ``[b, t]``."""
    with torch.no_grad():
        target = torch.log_softmax(reference(ids, use_cache=False).logits.float(), -1)
    logp = torch.log_softmax(model(ids, use_cache=False).logits.float(), -1)
    return (target.exp() * (target - logp)).sum(-1).mean()


def lr_factor(step: int, settings: DistillSettings) -> float:
    """The learning-rate multiplier at ``step`` (0-based): linear warm-up, then cosine to 0."""
    if step < settings.warmup:
        return (step + 1) / settings.warmup
    span = max(1, settings.steps - settings.warmup)
    return 0.5 * (1 + math.cos(math.pi * (step - settings.warmup) / span))


def _order(n: int, counter: int, seed: int) -> int:
    """The training sequence at position ``counter`` of the stream: epoch ``counter // n`` is a
    permutation drawn from ``seed`` and the epoch."""
    epoch, pos = divmod(counter, n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return int(perm[pos])


def distill(model: nn.Module, reference: nn.Module, ids: torch.Tensor, params: list[nn.Parameter],
            settings: DistillSettings, *, loss: Callable[[nn.Module, nn.Module, torch.Tensor], torch.Tensor]
            = kl_to_reference, progress: Callable[[int, float], None] | None = None,
            checkpointed: Sequence[nn.Module] = (), param_groups: list[dict] | None = None) -> DistillResult:
    """Train ``params`` (parameters of ``model``) so that ``model`` matches ``reference`` on the
    token sequences ``ids`` ``[n, t]`` (see the module docstring). ``progress(step, loss)`` is
    called after each step; ``checkpointed`` modules recompute their activations in the backward
    pass; ``param_groups`` (AdamW's groups over the same ``params``) give some their own learning
    rate or weight decay. Returns the losses; the parameters are left at the best held-out state."""
    n = ids.shape[0]
    n_held = max(1, round(n * settings.held_out)) if settings.held_out > 0 and n >= 2 else 0
    train_idx = list(range(n - n_held)) or list(range(n))
    held_idx = list(range(n - n_held, n)) or train_idx

    def autocast():  # a fresh context per use (autocast contexts are not reentrant)
        if not settings.autocast:
            return nullcontext()
        return torch.autocast(device_type=ids.device.type, dtype=torch.bfloat16)

    def measure() -> float:
        with torch.no_grad(), autocast():
            total = 0.0
            for a in range(0, len(held_idx), settings.batch):
                part = held_idx[a:a + settings.batch]
                total += float(loss(model, reference, ids[part])) * len(part)
            return total / len(held_idx)

    groups = [g for g in param_groups if g["params"]] if param_groups is not None else [{"params": params}]
    if {id(p) for g in groups for p in g["params"]} != {id(p) for p in params}:
        raise ValueError("param_groups must hold exactly the trained params")
    opt = torch.optim.AdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, settings))
    result = DistillResult()
    best = [p.detach().clone() for p in params]
    start = 0
    if settings.checkpoint is not None and settings.checkpoint.exists():
        state = torch.load(settings.checkpoint, weights_only=False)
        if state["settings"] != _resumable(settings):
            raise ValueError(f"{settings.checkpoint} was written by a run with other settings; delete it to start over")
        with torch.no_grad():
            for p, v in zip(params, state["params"], strict=True):
                p.copy_(v)
        best = state["best"]
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        result = state["result"]
        start = result.resumed_from = state["step"]
    else:
        result.held.append((0, measure()))
    with torch.enable_grad(), _checkpointing(checkpointed):
        for step in range(start, settings.steps):
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for micro in range(settings.accumulate):
                counter = (step * settings.accumulate + micro) * settings.batch
                part = [train_idx[_order(len(train_idx), counter + j, settings.seed)] for j in range(settings.batch)]
                with autocast():
                    value = loss(model, reference, ids[part]) / settings.accumulate
                value.backward()
                total += float(value.detach())
            opt.step()
            sched.step()
            result.losses.append(total)
            done = step + 1
            if (settings.eval_every and done % settings.eval_every == 0) or done == settings.steps:
                now = measure()
                result.held.append((done, now))
                if now < min(v for _, v in result.held[:-1]):
                    best, result.best_step = [p.detach().clone() for p in params], done
            if settings.checkpoint_every and done % settings.checkpoint_every == 0 and done < settings.steps:
                _save(settings, done, params, best, opt, sched, result)
            if progress is not None:
                progress(done, total)
    with torch.no_grad():
        for p, v in zip(params, best, strict=True):
            p.copy_(v)
    if settings.checkpoint is not None and settings.checkpoint.exists():
        settings.checkpoint.unlink()  # finished: a later run starts over
    return result


@contextmanager
def _checkpointing(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Within the ``with``, each module's forward under autograd keeps only its inputs and
    recomputes the rest in the backward pass."""
    from torch.utils.checkpoint import checkpoint

    saved = []
    for mod in modules:
        inner = mod.forward
        saved.append((mod, mod.__dict__.get("forward")))

        def forward(*args, _inner=inner, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        mod.forward = forward
    try:
        yield
    finally:
        for mod, own in saved:
            if own is None:
                del mod.forward
            else:
                mod.forward = own


def _resumable(settings: DistillSettings) -> dict:
    """The settings a resumed run must share (the checkpoint's own path and cadence aside)."""
    return {k: v for k, v in asdict(settings).items() if k not in ("checkpoint", "checkpoint_every", "autocast")}


def _save(settings: DistillSettings, step: int, params: list[nn.Parameter], best: list[torch.Tensor],
          opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler, result: DistillResult) -> None:
    path = settings.checkpoint
    if path is None:
        raise ValueError("a checkpoint needs a path")
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"settings": _resumable(settings), "step": step, "params": [p.detach().clone() for p in params],
                "best": best, "opt": opt.state_dict(), "sched": sched.state_dict(), "result": result}, tmp)
    os.replace(tmp, path)

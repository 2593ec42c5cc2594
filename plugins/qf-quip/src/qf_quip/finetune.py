"""QuIP#'s second stage, per block: with the codes fixed, fine-tune what is still continuous — each
weight's randomized-Hadamard sign vectors as real vectors (``SU``, ``SV``: a scale per input
and per output channel on the transformed sides) and the block's norm weights — so that the
quantized block's outputs match the original block's on the calibration inputs (QuIP#, §5).

The objective is the mean squared error against the float block's outputs on the same inputs
(those of the already quantized blocks before it, as the block loop hands them). Adam, whole
passes (``epochs``) over the block's calibration batches; every tenth batch (at least one, once
there are four) is held out and the state with the lowest held-out error is kept — the
unchanged block included, so fine-tuning never makes the held-out error worse. The vectors are
stored as float16 (``HadamardTransform.with_scales``), and training sees them rounded so (a
straight-through estimator); the held-out error of each epoch is measured with the norms rounded
to the checkpoint's dtype, as the artifact stores them: what is stored is what was measured.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from quantfoundry import Block, BlockInputs, HadamardTransform, QFError, QuantContext, QuantizedWeight
from quantfoundry.toolkit import kl_to_reference
from quantfoundry.toolkit.hadamard import hadamard_transform
from torch import nn


@dataclass(frozen=True)
class FinetuneSettings:
    epochs: int
    lr: float


def _stored(v: torch.Tensor) -> torch.Tensor:
    """``v`` as float16 stores it, with the gradient passing straight through."""
    return v + (v.half().float() - v).detach()


class _TunedLinear(nn.Module):
    """A quantized linear as a function of its transform vectors: ``s_out ⊙ Hᵀ(W_s · H(s_in ⊙ x))``
    (each ``H`` normalised), ``W_s`` the decoded stored weight (fixed)."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("ws", qw.stored_dequantize().float())
        t = qw.transforms[0] if qw.transforms else None
        s_in = None if t is None else t.signs("in")
        s_out = None if t is None else t.signs("out")
        self.s_in = None if s_in is None else nn.Parameter(s_in.float().clone())
        self.s_out = None if s_out is None else nn.Parameter(s_out.float().clone())
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        if self.s_in is not None:
            h = hadamard_transform(h * _stored(self.s_in))
        y = h @ self.ws.T
        if self.s_out is not None:
            y = hadamard_transform(y, transpose=True) * _stored(self.s_out)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)


def _swap(module: nn.Module, name: str, new: nn.Module) -> nn.Module:
    parent, _, child = name.rpartition(".")
    owner = module.get_submodule(parent) if parent else module
    old = getattr(owner, child)
    setattr(owner, child, new)
    return old


def _loss(block: Block, targets: list[torch.Tensor], batches: list[int]) -> float:
    total = 0.0
    with torch.no_grad():
        for i in batches:
            total += float(F.mse_loss(_block_out(block, i).float(), targets[i].float()))
    return total / max(len(batches), 1)


def _inputs(block: Block) -> BlockInputs:
    if block.inputs is None:
        raise QFError("quip fine-tuning needs calibration inputs; the run has none (use --calibrator text)")
    return block.inputs


def _block_out(block: Block, i: int) -> torch.Tensor:
    inputs = _inputs(block)
    out = block.module(inputs.hidden[i], **inputs.kwargs[i])
    return out[0] if isinstance(out, tuple) else out


def _norms(root: nn.Module, prefix: str, ctx: QuantContext) -> tuple[list[nn.Parameter], list[torch.dtype]]:
    """The float parameters of ``root``'s modules other than linears (its norms), and the dtype
    the artifact stores each in (the checkpoint's; a tensor it lacks keeps its own)."""
    from quantfoundry import QuantLinear

    named = [(".".join(x for x in (prefix, mname, pname) if x), p) for mname, mod in root.named_modules()
             if not isinstance(mod, (nn.Linear, _TunedLinear, QuantLinear))
             for pname, p in mod.named_parameters(recurse=False) if p.is_floating_point()]
    info = ctx.source.tensor_info if ctx.source is not None else {}
    return ([p for _, p in named],
            [info[n][0] if n in info and info[n][0].is_floating_point else p.dtype for n, p in named])


def _train(vectors: list[nn.Parameter], norms: list[nn.Parameter], stored_dtypes: list[torch.dtype],
           steps: Callable[[], Iterator[torch.Tensor]], measure: Callable[[], float],
           settings: FinetuneSettings) -> tuple[float, float, bool]:
    """Adam over ``vectors`` and ``norms``: ``settings.epochs`` passes of ``steps()`` (each yields
    one step's loss); after each pass ``measure()`` with the norms rounded to their stored dtypes
    (the vectors round in their forward). The best state — the untouched one included — is left
    in the parameters. Returns the measure before, the best one, and whether training improved it."""
    params = vectors + norms
    flags = [p.requires_grad for p in norms]

    def snapshot() -> list[torch.Tensor]:
        return [p.detach().clone() for p in params]

    try:
        before = best_value = measure()
        best, improved = snapshot(), False
        for p in norms:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=settings.lr)
        for _ in range(settings.epochs):
            with torch.enable_grad():
                for loss in steps():
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            kept = [p.detach().clone() for p in norms]
            with torch.no_grad():  # measured with the norms as the artifact stores them
                for p, dt in zip(norms, stored_dtypes, strict=True):
                    p.copy_(p.to(dt))
                now = measure()
                state = snapshot()
                for p, v in zip(norms, kept, strict=True):
                    p.copy_(v)
            if now < best_value:
                best_value, best, improved = now, state, True
        with torch.no_grad():
            for p, v in zip(params, best, strict=True):
                p.copy_(v)
    finally:
        for p, f in zip(norms, flags, strict=True):
            p.requires_grad_(f)
    return before, best_value, improved


def _with_tuned(qw: QuantizedWeight, mod: _TunedLinear) -> QuantizedWeight:
    """``qw`` with its Hadamard transform's vectors replaced by ``mod``'s."""
    t = qw.transforms[0] if qw.transforms else None
    if not isinstance(t, HadamardTransform):
        return qw
    return QuantizedWeight(qw.format, qw.shape, qw.dtype, qw.packed, qw.params, qw.perm, dict(qw.meta),
                           qw.tensor_params, qw.input_quant, qw.input_scale,
                           (t.with_scales(mod.s_in, mod.s_out), *qw.transforms[1:]))


def _vectors(tuned: dict[str, _TunedLinear]) -> list[nn.Parameter]:
    return [p for mod in tuned.values() for p in (mod.s_in, mod.s_out) if p is not None]


def finetune_block(block: Block, quantized: dict[str, QuantizedWeight], targets: list[torch.Tensor],
                   settings: FinetuneSettings, ctx: QuantContext) -> dict[str, QuantizedWeight]:
    """Fine-tune the block's transform vectors and norm weights (see the module docstring); the
    block's norm weights are left at the kept state, its linears at the new weights' values.
    Returns the weights with their tuned transforms."""
    n = len(_inputs(block).hidden)
    held = list(range(n - 1, -1, -10))[: max(1, n // 10)] if n >= 4 else []
    train = [i for i in range(n) if i not in held]
    pick = held or train  # fewer than four batches: keep the best training error
    tuned = {name: _TunedLinear(qw, block.linear(name).bias) for name, qw in quantized.items()}
    originals = {name: _swap(block.module, name, mod) for name, mod in tuned.items()}
    norms, stored_dtypes = _norms(block.module, block.prefix, ctx)

    def steps() -> Iterator[torch.Tensor]:
        for i in train:
            yield F.mse_loss(_block_out(block, i).float(), targets[i].float())

    try:
        before, best, improved = _train(_vectors(tuned), norms, stored_dtypes, steps,
                                        lambda: _loss(block, targets, pick), settings)
    finally:
        for name, mod in originals.items():
            _swap(block.module, name, mod)
    what = "held-out" if held else "training"
    ctx.note(f"quip fine-tuning: block {block.index}: {what} output MSE {before:.3g} -> {best:.3g} "
             f"({settings.epochs} epochs)")
    if not improved:
        return quantized  # the signs as they were (bits), the norms untouched
    out: dict[str, QuantizedWeight] = {}
    for name, qw in quantized.items():
        out[name] = new = _with_tuned(qw, tuned[name])
        lin = block.linear(name)
        lin.weight.data = new.dequantize(lin.weight.dtype).to(lin.weight.device)
    return out


def finetune_model(model: nn.Module, reference: nn.Module, ids: torch.Tensor, settings: FinetuneSettings,
                   batch: int, layers: str, ctx: QuantContext) -> dict[str, QuantizedWeight]:
    """QuIP#'s end-to-end pass: every block's transform vectors and norm weights at once, tuned
    by Adam so that the quantized model's next-token distributions match the original's — the
    mean KL divergence ``KL(p_original ‖ p_quantized)`` over the calibration tokens, the original
    run alongside, batch by batch (no logits kept). A tenth of the sequences (at least one) is
    held out; the epoch with the lowest held-out KL is kept, the untouched model included.
    Returns the weights whose transforms changed, by linear name."""
    from quantfoundry import QuantLinear

    quantized = {name: mod for name, mod in model.named_modules()
                 if isinstance(mod, QuantLinear) and name.startswith(layers + ".")}
    tuned = {name: _TunedLinear(mod.qweight, mod.bias) for name, mod in quantized.items()}
    for name, mod in tuned.items():
        _swap(model, name, mod)
    norms, stored_dtypes = _norms(model.get_submodule(layers), layers, ctx)
    n = ids.shape[0]
    held = list(range(n - max(1, n // 10), n)) if n >= 2 else []
    train = [i for i in range(n) if i not in held] or list(range(n))
    pick = held or train

    def kl(idx: list[int]) -> torch.Tensor:
        return kl_to_reference(model, reference, ids[idx])

    def steps() -> Iterator[torch.Tensor]:
        for a in range(0, len(train), batch):
            yield kl(train[a:a + batch])

    def held_kl() -> float:
        with torch.no_grad():
            return sum(float(kl(pick[a:a + batch])) * len(pick[a:a + batch])
                       for a in range(0, len(pick), batch)) / len(pick)

    try:
        before, best, improved = _train(_vectors(tuned), norms, stored_dtypes, steps, held_kl, settings)
    finally:
        for name, mod in quantized.items():
            _swap(model, name, mod)
    what = "held-out" if held else "training"
    ctx.note(f"quip end-to-end fine-tuning: {what} KL {before:.4g} -> {best:.4g} ({settings.epochs} epochs)")
    if not improved:
        return {}
    return {name: _with_tuned(mod.qweight, tuned[name]) for name, mod in quantized.items()
            if mod.qweight.transforms}

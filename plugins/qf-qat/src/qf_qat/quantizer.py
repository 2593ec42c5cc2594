"""Quantizer ``qat``: round every planned linear (round-to-nearest, or another quantizer as the
first stage), then train the whole model with its linears fake-quantized
(:class:`quantfoundry.toolkit.FakeQuant`: straight-through gradients, optionally learned grid
steps and offsets; inputs fake-quantized too where the plan has an activation scheme) towards the
original model's next-token distributions (:func:`quantfoundry.toolkit.distill`), and round the
trained weights once onto the grid the training saw: the artifact's values are the
fake-quantized model's.

With ``lora_rank`` the weights stay frozen and low-rank adapters are trained instead: each linear
computes with ``fake_quant(W + (alpha/rank)·B·A)``, and the merged ``W + (alpha/rank)·B·A`` is what
is rounded at the end — the adapters are inside the fake quantization, so the conversion stays
exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import quantfoundry as qf
import torch
import torch.nn.functional as F
from quantfoundry.toolkit import (
    DistillSettings,
    FakeQuant,
    Progress,
    distill,
    fake_quant_input,
    make_component,
)
from torch import nn

SWITCH = ("auto", "on", "off")


@dataclass(frozen=True, kw_only=True)
class QATOptions(qf.Options):
    steps: int = field(default=200, metadata={"help": "optimiser steps"})
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate of the weights or adapters (AdamW)"})
    grid_lr: float = field(default=0.0, metadata={
        "help": "peak learning rate of the learned grid steps and offsets (0: lr / 10)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW's weight decay (weights and adapters only)"})
    warmup: int = field(default=10, metadata={"help": "steps of linear warm-up before the cosine decay"})
    batch: int = field(default=4, metadata={"help": "sequences per micro-batch"})
    accumulate: int = field(default=1, metadata={"help": "micro-batches per step"})
    held_out: float = field(default=0.1, metadata={
        "help": "share of the calibration sequences held out to pick the best state"})
    eval_every: int = field(default=0, metadata={
        "help": "steps between held-out measurements (0: before training and at the end)"})
    learn_grid: bool = field(default=False, metadata={
        "help": "also learn each group's step and offset (LSQ+; affine grids that take them back)"})
    lora_rank: int = field(default=0, metadata={
        "help": "train rank-r adapters on frozen weights instead of the weights (0: the weights)"})
    lora_alpha: float = field(default=0.0, metadata={"help": "the adapters' scale alpha/rank (0: alpha = rank)"})
    inputs: bool = field(default=True, metadata={
        "help": "fake-quantize the inputs of linears that have an activation scheme (W8A8)"})
    start: str = field(default="original", metadata={
        "help": "where the trained weights start: original (the original weights where they round to the first "
                "stage's codes) or grid (the first stage's values)"})
    init: str = field(default="rtn", metadata={
        "help": "the quantizer whose result training starts from (rtn, gptq, awq, hqq, …; its defaults)"})
    seed: int = 0
    checkpoint: str = field(default="", metadata={"help": "file a stopped run resumes from (empty: none)"})
    checkpoint_every: int = field(default=0, metadata={"help": "steps between checkpoints"})
    autocast: str = field(default="auto", metadata={"help": "bfloat16 autocast: auto (on CUDA), on, off"})
    grad_checkpointing: str = field(default="auto", metadata={
        "help": "recompute each block's activations in the backward pass: auto (on CUDA), on, off"})

    def __post_init__(self) -> None:
        DistillSettings(**self._settings_fields())  # the same checks, before any work
        if self.init == "qat":
            raise ValueError("init names the quantizer QAT starts from: rtn, gptq, awq, hqq, …")
        if self.grid_lr < 0 or self.weight_decay < 0:
            raise ValueError("grid_lr and weight_decay must not be negative")
        if self.lora_rank < 0 or self.lora_alpha < 0:
            raise ValueError("lora_rank and lora_alpha must not be negative")
        if self.start not in ("grid", "original"):
            raise ValueError(f"start is grid or original, got {self.start!r}")
        for name in ("autocast", "grad_checkpointing"):
            if getattr(self, name) not in SWITCH:
                raise ValueError(f"{name} is auto, on or off, got {getattr(self, name)!r}")

    def _settings_fields(self) -> dict:
        return dict(steps=self.steps, lr=self.lr, weight_decay=self.weight_decay, warmup=self.warmup,
                    batch=self.batch, accumulate=self.accumulate, held_out=self.held_out,
                    eval_every=self.eval_every, seed=self.seed,
                    checkpoint=Path(self.checkpoint) if self.checkpoint else None,
                    checkpoint_every=self.checkpoint_every)

    def settings(self, device: torch.device) -> DistillSettings:
        return DistillSettings(**self._settings_fields(), autocast=_switch(self.autocast, device))


def _switch(value: str, device: torch.device) -> bool:
    return value == "on" or (value == "auto" and device.type == "cuda")


class FakeQuantLinear(nn.Module):
    """A linear trained through fake quantization: a float32 master weight (or a frozen weight
    and low-rank adapters), fake-quantized onto the grid of the quantized weight it starts from
    in every forward; its input fake-quantized too under that weight's activation scheme.

    ``master`` is where the trained weight starts (:func:`master_weight`)."""

    def __init__(self, qw: qf.QuantizedWeight, master: torch.Tensor, bias: torch.Tensor | None, *,
                 learn_grid: bool = False, lora_rank: int = 0, lora_alpha: float = 0.0, inputs: bool = True,
                 seed: int = 0) -> None:
        super().__init__()
        self.start = qw
        self.fq = FakeQuant(qw.format, start=qw, learn=learn_grid)
        self.bias = bias
        self.act = qw.input_quant if inputs else None
        self.lora_rank = lora_rank
        if lora_rank:
            self.register_buffer("frozen", master.to(torch.float32))
            out_f, in_f = qw.shape
            g = torch.Generator().manual_seed(seed)
            # the usual LoRA start: A random (Kaiming-uniform bound 1/sqrt(in)), B zero, so W + BA = W
            bound = 1 / math.sqrt(in_f)
            a = (torch.rand(lora_rank, in_f, generator=g) * 2 - 1) * bound
            self.lora_a = nn.Parameter(a.to(master.device))
            self.lora_b = nn.Parameter(torch.zeros(out_f, lora_rank, device=master.device))
            self.scale = (lora_alpha or lora_rank) / lora_rank
        else:
            self.weight = nn.Parameter(master.to(torch.float32))

    def merged(self) -> torch.Tensor:
        """The float weight that is fake-quantized (the master, or frozen + adapters)."""
        if self.lora_rank:
            return self.frozen + self.scale * (self.lora_b @ self.lora_a)
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            x = fake_quant_input(self.act, x, self.start.input_scale)
        w = self.fq(self.merged()).to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def quantized(self) -> qf.QuantizedWeight:
        """The trained weight rounded once: exactly what :meth:`forward` multiplied."""
        with torch.no_grad():
            out = self.fq.quantized(self.merged(), self.start.dtype)
        return replace(out, input_quant=self.start.input_quant, input_scale=self.start.input_scale)

    def trained(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(weights or adapters, grid parameters)."""
        main = [self.lora_a, self.lora_b] if self.lora_rank else [self.weight]
        return main, [self.fq.a, self.fq.b] if self.fq.learn else []


def master_weight(qw: qf.QuantizedWeight, original: torch.Tensor, start: str) -> torch.Tensor:
    """Where the trained weight starts. ``original``: the original weight where it rounds to the
    code the first stage chose (its place between grid points kept, so that small updates carry it
    across a rounding boundary — as torchao's QAT starts), the first stage's value elsewhere (GPTQ's
    error-compensated codes), provided the whole still rounds to the first stage's weight exactly
    (else ``grid``). ``grid``: the first stage's values — on grid points, so a weight changes code
    only once its updates add up to half a step, which takes a learning rate ten times larger.
    (pycode-7m, int3-g128 from RTN, 12 steps of 4 × 64 tokens: ``original`` at lr 1e-4 took the
    held-out KL from 0.167 to 0.130; ``grid`` did not move it at 1e-3 to 1e-2.)"""
    values = qw.dequantize(torch.float32)
    if start == "grid" or tuple(original.shape) != tuple(values.shape):
        return values
    fq = FakeQuant(qw.format, start=qw)
    with torch.no_grad():
        w = original.detach().to(device=values.device, dtype=torch.float32)
        mixed = torch.where(fq(w) == values, w, values)
        return mixed if torch.equal(fq(mixed), values) else values


class QATQuantizer(qf.Quantizer):
    name = "qat"
    description = ("quantization-aware training: fake quantization onto any format, distilled towards the original "
                   "model's next-token distributions, rounded once")
    Options = QATOptions
    scope = "block"
    needs_calibration = True

    options: QATOptions

    def __init__(self, options: QATOptions | None = None) -> None:
        super().__init__(options)
        self._init = make_component("quantizer", self.options.init, {})

    def check_format(self, fmt: qf.Format) -> str | None:
        if self._init.makes_transforms():
            return (f"qat trains weights in their own basis, and {self.options.init!r} stores them transformed "
                    f"({', '.join(sorted(self._init.makes_transforms()))}); start from rtn, gptq, awq or hqq")
        if self.options.learn_grid:
            try:  # a small weight of the format's own shape rules: does its grid take a step and offset back?
                FakeQuant(fmt, torch.randn(8, 256, generator=torch.Generator().manual_seed(0)) * 0.02, learn=True)
            except ValueError as e:
                if "no affine grid" in str(e):
                    return f"learn_grid needs a grid that stores a step and offset per group; {fmt.spec} has none"
        return self._init.check_format(fmt)

    def check_shape(self, shape: tuple[int, int]) -> str | None:
        return self._init.check_shape(shape)

    def permutes_columns(self) -> str | None:
        return self._init.permutes_columns()

    def makes_transforms(self) -> frozenset[str]:
        return self._init.makes_transforms()

    def quantize_block(self, block: qf.Block, ctx: qf.QuantContext) -> dict[str, qf.QuantizedWeight]:
        return self._init.quantize_block(block, ctx)

    def refines_model(self) -> bool:
        return True

    def refine_model(self, model: nn.Module, reference: nn.Module, calibration: torch.Tensor,
                     ctx: qf.QuantContext) -> dict[str, qf.QuantizedWeight]:
        o = self.options
        # the decoder blocks' linears (the head, quantized by some exporters, is left as it is)
        prefix = ctx.source.architecture.layers + "." if ctx.source is not None else ""
        quantized = {name: mod for name, mod in model.named_modules()
                     if isinstance(mod, qf.QuantLinear) and name.startswith(prefix)}
        for name, mod in quantized.items():
            if mod.qweight.perm is not None or mod.qweight.transforms:
                raise qf.errors.UsageError(f"qat trains weights in their own column order; {name} came from "
                                           f"{o.init!r} permuted or transformed (turn act-order off)")
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        fake: dict[str, FakeQuantLinear] = {}
        for i, (name, mod) in enumerate(quantized.items()):
            qw = mod.qweight
            master = master_weight(qw, reference.get_submodule(name).weight, o.start)
            fake[name] = FakeQuantLinear(qw, master, mod.bias, learn_grid=o.learn_grid, lora_rank=o.lora_rank,
                                         lora_alpha=o.lora_alpha, inputs=o.inputs, seed=o.seed * 7919 + i)
        main = [p for m in fake.values() for p in m.trained()[0]]
        grid = [p for m in fake.values() for p in m.trained()[1]]
        settings = o.settings(calibration.device)
        blocks = []
        if _switch(o.grad_checkpointing, calibration.device) and ctx.source is not None:
            blocks = list(model.get_submodule(ctx.source.architecture.layers).children())
        for name, mod in fake.items():
            _swap(model, name, mod)
        try:
            with Progress(enabled=ctx.progress, total=o.steps, label="qat", unit="steps") as bar:
                seen = [0]

                def step_done(done: int, loss: float) -> None:
                    for _ in range(done - seen[0]):
                        bar.advance()
                    seen[0] = done
                    bar.describe(f"qat  loss {loss:.4g}")

                result = distill(model, reference, calibration, main + grid, settings, progress=step_done,
                                 checkpointed=blocks,
                                 param_groups=[{"params": main},
                                               {"params": grid, "lr": o.grid_lr or o.lr / 10, "weight_decay": 0.0}])
            out = {name: mod.quantized() for name, mod in fake.items()}
        finally:
            for name, mod in quantized.items():
                _swap(model, name, mod)
            for n, p in model.named_parameters():
                p.requires_grad_(flags.get(n, False))
        trained = f"adapters of rank {o.lora_rank}" if o.lora_rank else "weights"
        ctx.note(f"qat: held-out KL {result.before:.4g} -> {result.best:.4g} (best at step {result.best_step} of "
                 f"{o.steps}; {trained}{' and grid' if o.learn_grid else ''} trained on "
                 f"{o.steps * o.batch * o.accumulate} sequences of {calibration.shape[1]} tokens)")
        return out


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)

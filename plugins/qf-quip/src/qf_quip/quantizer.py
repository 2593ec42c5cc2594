"""Quantizer ``quip`` (alias ``quip-sharp``): QuIP#'s incoherence processing and BlockLDLQ.

Per decoder block, true-sequentially (q/k/v → o → gate/up → down, each on the inputs of the
ones before it already quantized), for each group of linears that read one input:

1. the input's Hessian ``H = 2 X Xᵀ / n`` from the calibration forward
   (:func:`quantfoundry.toolkit.collect_input_stats`);
2. **incoherence processing**: random orthogonal ``Q_in`` (shared by the group: one input) and
   ``Q_out`` (one per weight), each a Hadamard matrix times random signs over √n
   (:class:`quantfoundry.HadamardTransform`): the weights become ``Q_out W Q_inᵀ`` and the
   Hessian ``Q_in H Q_inᵀ`` — entries spread evenly, no outlier column or row left for the
   2-bit grid to clip (QuIP#, §3);
3. **BlockLDLQ**: the core's LDLQ loop rounds the transformed weights onto the planned format —
   8 columns jointly for ``e8p`` — with Hessian error feedback
   (:func:`quantfoundry.toolkit.solve_stacked`);
4. the codes are stored with the transform (``QuantizedWeight.transforms``, kind ``rht``: the
   sign vectors as bits); the reference kernel multiplies by ``Q_outᵀ Ŵ Q_in``, the original
   weight's approximation, and the block's later stages run on it.

The sign vectors come from ``seed`` and the linear's name, so a run is reproducible. Any format
works (scalar grids get QuIP with incoherence processing); ``e8p`` is QuIP#'s.

With ``finetune_epochs``, QuIP#'s second stage follows per block (:mod:`qf_quip.finetune`): the
transforms' sign vectors become real vectors and, with the block's norms, are tuned by Adam to
the float block's outputs, the codes fixed; with ``finetune_e2e_epochs``, its end-to-end pass
after the last block (:meth:`refine_model`): every block's vectors and norms at once, to the
original model's next-token distributions.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import torch
from quantfoundry import Block, HadamardTransform, QFError, QuantContext, QuantizedWeight, Quantizer
from quantfoundry.toolkit import HessianError, LDLQOptions, collect_input_stats, input_stages, solve_stacked
from quantfoundry.toolkit.hadamard import factor
from torch import nn

from .finetune import FinetuneSettings, finetune_block, finetune_model


@dataclass(frozen=True, kw_only=True)
class QuipOptions(LDLQOptions):
    incoherence: bool = field(default=True, metadata={
        "help": "randomized Hadamard transforms on both sides of every weight (QuIP#); false: BlockLDLQ alone"})
    seed: int = field(default=0, metadata={"help": "seed of the transforms' sign vectors (with each linear's name)"})
    true_sequential: bool = field(default=True, metadata={
        "help": "quantize a block's input groups in order, each on the inputs of the already-quantized ones"})
    finetune_epochs: int = field(default=0, metadata={
        "help": "QuIP#'s fine-tuning: passes of Adam over each block's calibration batches, tuning the transforms' "
                "sign vectors (as real vectors) and the norms to the float block's outputs; 0: off"})
    finetune_lr: float = field(default=1e-3, metadata={"help": "Adam's learning rate for finetune_epochs"})
    finetune_e2e_epochs: int = field(default=0, metadata={
        "help": "QuIP#'s end-to-end pass once every block is rounded: passes of Adam over the calibration "
                "sequences tuning all blocks' vectors and norms to the original model's next-token "
                "distributions (KL); keeps the original model in memory beside the quantized one; 0: off"})
    finetune_e2e_lr: float = field(default=1e-4, metadata={"help": "Adam's learning rate for finetune_e2e_epochs"})
    finetune_e2e_batch: int = field(default=8, metadata={"help": "sequences per Adam step of the end-to-end pass"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.finetune_epochs < 0:
            raise ValueError(f"finetune_epochs must be 0 (off) or more, got {self.finetune_epochs}")
        if not self.finetune_lr > 0:
            raise ValueError(f"finetune_lr must be positive, got {self.finetune_lr}")
        if self.finetune_e2e_epochs < 0:
            raise ValueError(f"finetune_e2e_epochs must be 0 (off) or more, got {self.finetune_e2e_epochs}")
        if not self.finetune_e2e_lr > 0:
            raise ValueError(f"finetune_e2e_lr must be positive, got {self.finetune_e2e_lr}")
        if self.finetune_e2e_batch < 1:
            raise ValueError(f"finetune_e2e_batch must be at least 1, got {self.finetune_e2e_batch}")


class QuipQuantizer(Quantizer):
    name = "quip"
    description = "QuIP#: randomized Hadamard incoherence + BlockLDLQ (Hessian error feedback) onto e8p or any format"
    Options = QuipOptions
    scope = "block"
    needs_calibration = True

    options: QuipOptions

    def refines_model(self) -> bool:
        return self.options.finetune_e2e_epochs > 0

    def refine_model(self, model: nn.Module, reference: nn.Module, calibration: torch.Tensor,
                     ctx: QuantContext) -> dict[str, QuantizedWeight]:
        o = self.options
        layers = ctx.source.architecture.layers if ctx.source is not None else "model.layers"
        return finetune_model(model, reference, calibration, FinetuneSettings(o.finetune_e2e_epochs, o.finetune_e2e_lr),
                              o.finetune_e2e_batch, layers, ctx)

    def makes_transforms(self) -> frozenset[str]:
        return frozenset({"rht"}) if self.options.incoherence else frozenset()

    def check_shape(self, shape: tuple[int, int]) -> str | None:
        """``None`` if both widths have a Hadamard transform here (or incoherence is off), else why
        not — asked for every planned weight before any work."""
        if not self.options.incoherence:
            return None
        for n in shape:
            try:
                factor(n)
            except ValueError as exc:
                return f"{exc}; pass --quantizer-opt incoherence=false"
        return None

    def quantize_block(self, block: Block, ctx: QuantContext) -> dict[str, QuantizedWeight]:
        if block.inputs is None:
            raise QFError("quip needs calibration inputs; the run has none (use --calibrator text)")
        o = self.options
        targets = block.run() if o.finetune_epochs else []  # the float block's outputs
        out: dict[str, QuantizedWeight] = {}
        for names in input_stages(block, self.options.true_sequential):
            stats = collect_input_stats(block, names, want=("gram",), device=ctx.device)
            for owner, members in stats.sharing().items():
                if stats.stats[owner].count == 0:
                    raise QFError(f"quip: {block.full_name(owner)} saw no calibration token; calibrate on more text")
                out.update(self._solve(block, members, stats.stats[owner].hessian(), ctx))
            for n in names:  # later stages see this stage's quantized outputs
                lin = block.linear(n)
                lin.weight.data = out[n].dequantize(lin.weight.dtype).to(lin.weight.device)
        if o.finetune_epochs:
            out = finetune_block(block, out, targets, FinetuneSettings(o.finetune_epochs, o.finetune_lr), ctx)
        return out

    def _seed(self, block: Block, name: str) -> int:
        return zlib.crc32(f"{self.options.seed}:{block.full_name(name)}".encode()) & 0x3FFFFFFF

    def _solve(self, block: Block, members: list[str], hessian: torch.Tensor,
               ctx: QuantContext) -> dict[str, QuantizedWeight]:
        o = self.options
        members = sorted(members, key=lambda n: block.formats[n].spec)  # same format → one segment
        weights = [block.linear(n).weight for n in members]
        transforms: list[HadamardTransform | None] = [None] * len(members)
        work = [w.detach().to(ctx.device, torch.float32) for w in weights]
        h = hessian.to(ctx.device, torch.float32)
        if o.incoherence:  # every width was checked with the plan (check_shape)
            first = HadamardTransform.random(tuple(weights[0].shape), self._seed(block, members[0]))
            transforms = [first] + [HadamardTransform.with_input_signs(first, w.shape[0], self._seed(block, n))
                                    for n, w in zip(members[1:], weights[1:], strict=True)]
            work = [t.from_dense(w) for t, w in zip(transforms, work, strict=True)]
            h = first.hessian(h)
        try:
            res, solved = solve_stacked(work, [block.formats[n] for n in members], h, block_size=o.block_size,
                                        damp_percent=o.damp_percent, damp_max=o.damp_max)
        except HessianError as exc:
            raise QFError(f"quip: {block.full_name(members[0])}: {exc}; raise --quantizer-opt damp_max "
                          "or calibrate on more (or more varied) text") from None
        if res.damp_tries > 1:
            ctx.note(f"quip: {block.full_name(members[0])}: Cholesky failed at damp_percent={o.damp_percent:g}, "
                     f"succeeded at {res.damp:g}")
        return {n: QuantizedWeight(sw.fmt, tuple(w.shape), w.dtype, sw.fmt.pack(sw.codes), sw.params,
                                   meta={"quip": {"damp": res.damp, "seed": None if t is None else t.seed}},
                                   tensor_params=sw.tensor_params, transforms=() if t is None else (t,))
                for n, w, sw, t in zip(members, weights, solved, transforms, strict=True)}

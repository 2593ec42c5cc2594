"""Quantizer ``gptq``: Hessian-guided rounding (Frantar et al. 2022) onto any planned format.

Per decoder block, true-sequentially: for each input group of the architecture map in order
(q/k/v → o → gate/up → down), run the block on its calibration inputs with the groups before
already quantized, accumulate the Hessian of the group's input
(:func:`quantfoundry.toolkit.collect_input_stats`), and round the group's linears column by
column with error feedback (:func:`quantfoundry.toolkit.ldlq_solve`). Linears that read one
input share one Hessian and one column loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from quantfoundry import Block, Format, QFError, QuantContext, QuantizedWeight, Quantizer
from quantfoundry.toolkit import (
    BlockStats,
    HessianError,
    LDLQOptions,
    collect_input_stats,
    input_stages,
    solve_stacked,
    split_work,
)

from .replay import OutputReplay, default_budget


@dataclass(frozen=True, kw_only=True)
class GPTQOptions(LDLQOptions):
    desc_act: bool = field(default=False, metadata={
        "help": "act-order: quantize columns by decreasing H diagonal (codes stored permuted, with g_idx)"})
    static_groups: bool = field(default=False, metadata={
        "help": "fit every group's grid before the column loop (with desc_act: stored in the original order)"})
    true_sequential: bool = field(default=True, metadata={
        "help": "quantize a block's input groups in order, each on the inputs of the already-quantized ones"})
    fit_importance: bool = field(default=True, metadata={
        "help": "fit grids weighted by H's diagonal where the format uses importance (GGUF imatrix encoders)"})
    fused: bool = field(default=True, metadata={
        "help": "on CUDA, run each lazy batch as one Triton kernel (affine grids, groups fitted in the loop)"})
    replay_mb: int = field(default=-1, metadata={
        "help": "true-sequential: memory (MB) for replaying finished linears' outputs in the block's later "
                "forwards instead of recomputing them; -1 = a quarter of the free memory, 0 = off"})

    stats_mb: int = field(default=2048, metadata={
        "help": "memory (MB) for one true-sequential stage's Hessians: a stage of more experts is cut into "
                "forwards over fewer experts each (the same Hessians; 0 = no limit)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stats_mb < 0:
            raise ValueError(f"stats_mb must be >= 0 (0 = no limit), got {self.stats_mb}")
        if self.replay_mb < -1:
            raise ValueError(f"replay_mb must be -1 (auto), 0 (off) or a size in MB, got {self.replay_mb}")


class GPTQQuantizer(Quantizer):
    name = "gptq"
    description = "GPTQ: column-by-column rounding with Hessian error feedback, onto any scalar format"
    Options = GPTQOptions
    scope = "block"
    needs_calibration = True
    shards_calibration = True  # its Hessians come from collect_input_stats alone

    options: GPTQOptions

    def check_format(self, fmt: Format) -> str | None:
        if fmt.block_width != 1:
            return f"GPTQ rounds one column at a time; {fmt.spec} rounds {fmt.block_width} columns jointly"
        return None

    def permutes_columns(self) -> str | None:
        if self.options.desc_act and not self.options.static_groups:
            return ("pass --quantizer-opt static_groups=true (act-order with grids fitted before the loop, "
                    "codes in the original order) or desc_act=false")
        return None

    def quantize_block(self, block: Block, ctx: QuantContext) -> dict[str, QuantizedWeight]:
        if block.inputs is None:
            raise QFError("gptq needs calibration inputs; the run has none (use --calibrator text)")
        out: dict[str, QuantizedWeight] = {}
        stages = input_stages(block, self.options.true_sequential,
                              stats_budget=self.options.stats_mb * 2**20 or None)
        replay = OutputReplay(block, self._replay_budget(ctx) if len(stages) > 1 else 0)
        for names in stages:
            with replay.active():
                stats = collect_input_stats(block, names, want=("gram",), device=ctx.device,
                                            on_batch=replay.start_batch)
            sharing = stats.sharing()
            for owner, members in sharing.items():
                if len(members) > 1:
                    ctx.note("gptq: linears reading one input share one Hessian and one column loop: "
                             + " + ".join(members))
                if stats.stats[owner].count == 0:
                    ctx.note(f"gptq: {block.full_name(owner)} saw no calibration token: rounded to nearest")
                    for n in members:
                        out[n] = block.formats[n].quantize(block.linear(n).weight.float(), None)
            solve = [owner for owner in sharing if stats.stats[owner].count > 0]
            # across processes each Hessian's column loop runs on one rank, its weights sent to all
            def one(owner: str, sharing: dict = sharing, stats: BlockStats = stats) -> dict[str, QuantizedWeight]:
                return self._solve(block, sharing[owner], stats.stats[owner].hessian(), ctx)
            solved = split_work(solve, one, notes=ctx.notes)
            for owner in solve:
                out.update({n: qw.to(ctx.device) for n, qw in solved[owner].items()})
            for n in names:  # later groups see this group's quantized outputs
                lin = block.linear(n)
                lin.weight.data = out[n].dequantize(lin.weight.dtype).to(lin.weight.device)
            replay.finalize(names)
        if replay.used:  # the next block's inputs, replaying what is recorded (one forward saved)
            with replay.active(record=False):
                block.outputs = block.run(on_batch=replay.start_batch)
        return out

    def _replay_budget(self, ctx: QuantContext) -> int:
        mb = self.options.replay_mb
        return default_budget(ctx.device) if mb < 0 else mb * 2**20

    def _solve(self, block: Block, members: list[str], hessian: torch.Tensor,
               ctx: QuantContext) -> dict[str, QuantizedWeight]:
        o = self.options
        members = sorted(members, key=lambda n: block.formats[n].spec)  # same format → one segment
        weights = [block.linear(n).weight for n in members]
        importance = None
        if o.fit_importance:
            brought = ctx.importance.get(block.full_name(members[0]))
            importance = brought if brought is not None else torch.diagonal(hessian) / 2
        try:
            res, solved = solve_stacked([w.detach().to(ctx.device) for w in weights],
                                        [block.formats[n] for n in members], hessian,
                                        block_size=o.block_size, desc_act=o.desc_act,
                                        static_groups=o.static_groups, damp_percent=o.damp_percent,
                                        damp_max=o.damp_max, importance=importance, fused=o.fused)
        except HessianError as exc:
            raise QFError(f"gptq: {block.full_name(members[0])}: {exc}; raise --quantizer-opt damp_max "
                          "or calibrate on more (or more varied) text") from None
        if res.damp_tries > 1:
            ctx.note(f"gptq: {block.full_name(members[0])}: Cholesky failed at damp_percent={o.damp_percent:g}, "
                     f"succeeded at {res.damp:g}")
        if res.dead_columns:
            ctx.note(f"gptq: {block.full_name(members[0])}: {res.dead_columns} input channel(s) never active "
                     "in calibration: rounded to nearest, no error feedback")
        return {n: QuantizedWeight(sw.fmt, tuple(w.shape), w.dtype, sw.fmt.pack(sw.codes), sw.params,
                                   perm=None if res.perm is None else res.perm.clone(),
                                   meta={"gptq": {"damp": res.damp}}, tensor_params=sw.tensor_params)
                for n, w, sw in zip(members, weights, solved, strict=True)}

"""Quantizer ``awq``: activation-aware weight quantization (Lin et al. 2023) onto any format,
and its first half alone, the transform ``awq-scale``.

Per decoder block: one float forward collects, for every input group of the architecture map
(input norm → q/k/v; v → o; post-attention norm → gate/up; up → down), the mean |x| per
input channel and the Gram matrix of the group's input (of each expert's input, in a mixture
of experts)
(:func:`quantfoundry.toolkit.collect_input_stats`). For each group in order, the scale
``s = mean|x|^α`` minimising the group's output error on the *planned* format (an int grid, a
K-quant of a GGUF mix, …) is searched and folded into the group's source
(:func:`quantfoundry.toolkit.apply_fold`) — that much is the transform ``awq-scale``, which a
recipe may put before another quantizer (``--quantizer awq --quantizer gptq`` runs it, then
GPTQ). ``awq`` itself goes on: each linear's per-group clipping is searched on the scaled
weights, and the linear is rounded to nearest on its planned format — the values the search
scored are the values stored.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
from quantfoundry import Block, Format, Options, QFError, QuantContext, QuantizedWeight, Quantizer, Transform
from quantfoundry.toolkit import (
    BlockGroup,
    FoldPoint,
    apply_fold,
    block_groups,
    collect_input_stats,
    fold_point,
)

from .search import search_clip, search_scale


@dataclass(frozen=True, kw_only=True)
class AWQScaleOptions(Options):
    n_grid: int = field(default=20, metadata={
        "help": "scale exponents α searched: n_grid points in [0, 1) (α = 0 is plain round-to-nearest)"})
    duo_scaling: bool = field(default=False, metadata={
        "help": "s = mean|x|^α / mean|w|^(1-α) (AutoAWQ's default) instead of the paper's mean|x|^α"})
    fold_gqa: bool = field(default=True, metadata={
        "help": "fold v_proj → o_proj under grouped-query attention, one scale per KV channel"})
    fit_importance: bool = field(default=True, metadata={
        "help": "fit grids weighted by mean x² of the (scaled) inputs where the format uses importance (GGUF)"})
    exact_search: bool = field(default=False, metadata={
        "help": "rank the search's candidates with the format's exact fit; false (default): with its round trip "
                "for searches (GGML types on CPU: llama.cpp's searches with SIMD-lane sums, about 2x faster, the "
                "same codes in ~98% of rows; the final encode is exact either way)"})

    def __post_init__(self) -> None:
        if self.n_grid < 1:
            raise ValueError(f"n_grid must be >= 1, got {self.n_grid}")


@dataclass(frozen=True, kw_only=True)
class AWQOptions(AWQScaleOptions):
    clip: bool = field(default=True, metadata={
        "help": "search each group's clipping range (largest magnitude shrunk) after scaling"})
    clip_grid: int = field(default=20, metadata={"help": "clipping steps of 1/clip_grid"})
    max_shrink: float = field(default=0.5, metadata={
        "help": "clip at most this fraction off a group's largest magnitude"})
    no_clip: str = field(default="*q_proj,*k_proj", metadata={
        "help": "comma-separated patterns of linears never clipped (q/k: their error passes through softmax)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_grid < 1 or self.clip_grid < 1:
            raise ValueError(f"n_grid and clip_grid must be >= 1, got {self.n_grid} and {self.clip_grid}")
        if not 0 < self.max_shrink < 1:
            raise ValueError(f"max_shrink must be in (0, 1), got {self.max_shrink}")


@dataclass
class _Scaled:
    """Per linear of a block after the scale search: the Gram matrix and importance of its
    (scaled) input, and what the search chose."""

    grams: dict[str, torch.Tensor | None] = field(default_factory=dict)
    imps: dict[str, torch.Tensor | None] = field(default_factory=dict)
    meta: dict[str, dict] = field(default_factory=dict)
    groups: list[BlockGroup] = field(default_factory=list)


def _check_scalar(fmt: Format) -> str | None:
    if fmt.block_width != 1:
        return f"AWQ scales input channels one by one; {fmt.spec} rounds {fmt.block_width} columns jointly"
    return None


class AWQScale(Transform):
    name = "awq-scale"
    description = "AWQ's scale search alone: activation-aware per-channel scales folded into the model, no rounding"
    Options = AWQScaleOptions
    needs_calibration = True
    shards_calibration = True  # its statistics come from collect_input_stats alone

    options: AWQScaleOptions

    def check_format(self, fmt: Format) -> str | None:
        return _check_scalar(fmt)

    def transform_block(self, block: Block, ctx: QuantContext) -> None:
        scale_block(block, ctx, self.options, "awq-scale")


class AWQQuantizer(Quantizer):
    name = "awq"
    description = "AWQ: activation-aware per-channel scales folded into the model, clipping, then rounding"
    Options = AWQOptions
    scope = "block"
    needs_calibration = True
    shards_calibration = True  # its statistics come from collect_input_stats alone

    options: AWQOptions

    def check_format(self, fmt: Format) -> str | None:
        return _check_scalar(fmt)

    def as_transform(self) -> Transform:
        """Before another quantizer: the scale search and fold only (``awq-scale``)."""
        o = self.options
        return AWQScale(AWQScaleOptions(n_grid=o.n_grid, duo_scaling=o.duo_scaling, fold_gqa=o.fold_gqa,
                                        fit_importance=o.fit_importance, exact_search=o.exact_search))

    def quantize_block(self, block: Block, ctx: QuantContext) -> dict[str, QuantizedWeight]:
        o = self.options
        scaled = scale_block(block, ctx, o, "awq")
        out: dict[str, QuantizedWeight] = {}
        no_clip = [p.strip() for p in o.no_clip.split(",") if p.strip()]
        for g in scaled.groups:
            for m in g.planned:
                fmt = block.formats[m]
                lin = block.linear(m)
                w = lin.weight.detach().to(ctx.device, torch.float32)
                info = dict(scaled.meta.get(m, {}))
                gram = scaled.grams[m]
                if o.clip and gram is not None and not any(fnmatch.fnmatchcase(m, p) for p in no_clip):
                    clip = search_clip(w, fmt, gram, scaled.imps[m], n_grid=o.clip_grid,
                                       max_shrink=o.max_shrink, exact=o.exact_search)
                    w = clip.clipped
                    info.update(clip_loss_before=clip.loss_before, clip_loss_after=clip.loss_after)
                qw = fmt.quantize(w, scaled.imps[m])
                qw.meta = {**(qw.meta or {}), "awq": info}
                out[m] = qw
        return out


def scale_block(block: Block, ctx: QuantContext, o: AWQScaleOptions, who: str) -> _Scaled:
    """Search and fold every input group's scale, in order; the statistics of the scaled inputs.

    Linears of a group called with one tensor (q/k/v) share one entry of statistics; the
    experts of a mixture of experts, which read one norm's output on different tokens, keep
    their own: the group's objective sums each planned linear's output error on its own
    tokens, its ``mean |x|`` is over every (token, expert) input, and each linear is clipped
    on its own Gram matrix (AutoAWQ's Mixtral: the scale judged on the whole MoE module's
    output)."""
    if block.inputs is None:
        raise QFError(f"{who} needs calibration inputs; the run has none (use --calibrator text)")
    groups = block_groups(block, who)
    stats = collect_input_stats(block, [m for g in groups for m in g.members], want=("gram", "abs_sum"),
                                device=ctx.device)
    config = ctx.source.config if ctx.source is not None else None
    stored = ctx.source.storage_dtype if ctx.source is not None else torch.float32
    out = _Scaled(groups=groups)
    for g in groups:
        owners = list(dict.fromkeys(stats.owner[m] for m in g.members))
        total = sum(stats.stats[own].count for own in owners)
        grams: dict[str, torch.Tensor | None] = dict.fromkeys(g.members)
        imps: dict[str, torch.Tensor | None] = dict.fromkeys(g.members)
        if total == 0:
            ctx.note(f"{who}: {g.members[0]} saw no calibration token: its group is rounded to nearest")
        else:
            for m in g.members:
                if stats[m].count == 0:  # an expert no token reached: rounded to nearest
                    continue
                grams[m] = stats[m].gram / total
                brought = ctx.importance.get(block.full_name(m))
                imps[m] = (brought if brought is not None else torch.diagonal(grams[m]).clone()) \
                    if o.fit_importance else None
            n_in = block.linear(g.members[0]).in_features
            point = fold_point(block, g.group, n_in, config, o.fold_gqa)
            if isinstance(point, str):
                ctx.note(f"{who}: group {', '.join(g.group.linears)} not scaled: {point}")
            else:
                x_mean = (sum(stats.stats[own].abs_sum for own in owners) / total).float()
                grams, imps, info = _scale(block, g, point, x_mean, grams, imps, stored, o)
                out.meta.update({m: info for m in g.members})
        out.grams.update(grams)
        out.imps.update(imps)
    return out


def _scale(block: Block, g: BlockGroup, point: FoldPoint, x_mean: torch.Tensor,
           grams: dict[str, torch.Tensor | None], imps: dict[str, torch.Tensor | None], stored: torch.dtype,
           o: AWQScaleOptions) -> tuple[dict[str, torch.Tensor | None], dict[str, torch.Tensor | None], dict]:
    """Search the group's scale, fold it; the Gram matrices and importances of the scaled inputs."""
    lins = [block.linear(m) for m in g.members]
    device = next(h for h in grams.values() if h is not None).device
    weights = [lin.weight.detach().to(device, torch.float32) for lin in lins]
    # a linear kept in float, or one that saw no token, is not scored (its scale is folded all the same)
    formats = [block.formats.get(m) if grams[m] is not None else None for m in g.members]
    zero = torch.zeros(0, device=device)
    res = search_scale(weights, formats, x_mean, [grams[m] if grams[m] is not None else zero for m in g.members],
                       [imps[m] for m in g.members], n_grid=o.n_grid, duo_scaling=o.duo_scaling,
                       tie=point.tie, exact=o.exact_search)
    prev_name = g.group.prev
    apply_fold(point, lins, res.scale.to(lins[0].weight.device), res.searched.to(lins[0].weight.device),
               block.architecture.norm_weight_offset, stored, quantized_prev=prev_name in block.formats)
    for m, lin in zip(g.members, lins, strict=True):
        if m not in block.formats:  # kept in float: what the artifact holds
            lin.weight.copy_(lin.weight.to(stored).to(lin.weight.dtype))
    s = res.scale.to(device)
    scaled_grams = {m: None if h is None else h / (s.unsqueeze(1) * s.unsqueeze(0)) for m, h in grams.items()}
    scaled_imps = {m: None if i is None else i / s.square() for m, i in imps.items()}
    return scaled_grams, scaled_imps, {"alpha": res.alpha, "loss": res.loss, "loss_rtn": res.loss_rtn}

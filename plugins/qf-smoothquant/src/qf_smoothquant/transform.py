"""Transform ``smoothquant`` (Xiao et al. 2023): move the activations' outlier channels into the
weights before W8A8 quantization, with the float model unchanged.

For every input group of the architecture map (input norm → q/k/v, post-attention norm →
gate/up and, with ``folds=all``, v → o and up → down) with a fold point, per input channel
``j``::

    s_j = max|X_j|^α / max|W_j|^(1−α)

(``max|X_j|`` over every calibration token, :func:`quantfoundry.toolkit.collect_input_stats`;
``max|W_j|`` over the rows of every linear of the group), the group's weight columns are
multiplied by ``s`` and the fold point divided by it (:func:`quantfoundry.toolkit.apply_fold`:
the norm's weight, or the previous linear's rows; under grouped-query attention one scale per
KV channel, ``max`` over the channels that share it). A channel that never fires (``max|X_j|
= 0``) keeps ``s_j = 1``; ``s`` is at least ``1e-5`` (the paper's clamp). Into a norm computing
``x · (1 + w)`` (Gemma) stored in 16 bits, ``s`` is at most ``2|1 + w|`` (at least 1): the
folded ``(1 + w)/s − 1`` must stay representable, or the float model would change.

``α`` (the migration strength) is 0.5 by default; ``search=true`` picks, per group, the ``α`` of
``{0, 1/alpha_grid, …, 1}`` whose W8A8 output error on a sample of the group's calibration
inputs is smallest — the weights rounded to their planned formats, the inputs quantized as the
plan's activation scheme says (a static scheme with its ``absmax`` scale of the smoothed
inputs): ``Σ ‖X Wᵀ − q(X/s) q(W·s)ᵀ‖²``. A recipe stage: ``--quantizer smoothquant
--quantizer gptq`` smooths, then GPTQ rounds the smoothed weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from quantfoundry import ActQuant, Block, Format, Options, QFError, QuantContext, Transform
from quantfoundry.toolkit import BlockGroup, Tie, apply_fold, block_groups, collect_input_stats, fold_point


@dataclass(frozen=True, kw_only=True)
class SmoothQuantOptions(Options):
    alpha: float = field(default=0.5, metadata={"help": "migration strength α in [0, 1] (0: no smoothing)"})
    search: bool = field(default=False, metadata={
        "help": "search α per group on the W8A8 output error of a calibration sample (else alpha for all)"})
    alpha_grid: int = field(default=20, metadata={"help": "α searched in steps of 1/alpha_grid"})
    search_tokens: int = field(default=2048, metadata={"help": "calibration tokens per group the search scores"})
    folds: str = field(default="all", metadata={
        "help": "all (norms and the linear folds v→o, up→down) or norms (the paper's and llm-compressor's "
                "default mappings)"})
    fold_gqa: bool = field(default=True, metadata={
        "help": "smooth o_proj under grouped-query attention, one scale per KV channel"})

    def __post_init__(self) -> None:
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.alpha_grid < 1 or self.search_tokens < 1:
            raise ValueError(f"alpha_grid and search_tokens must be >= 1, got {self.alpha_grid}, {self.search_tokens}")
        if self.folds not in ("all", "norms"):
            raise ValueError(f"folds must be all or norms, got {self.folds!r}")


def smoothing_scale(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """``max|X|^α / max|W|^(1−α)`` per channel (float32), 1 where the channel never fired,
    at least ``1e-5``."""
    x, w = x_max.float(), w_max.float().clamp(min=1e-5)
    s = (x.clamp(min=1e-5).pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-5)
    return torch.where(x > 0, s, torch.ones_like(s))


def _cap_for_offset_norm(s: torch.Tensor, w: torch.Tensor, offset: float) -> torch.Tensor:
    """A norm computing ``x · (offset + w)`` (Gemma: ``1 + w``) takes the scale as
    ``w' = (offset + w)/s − offset``: for a large ``s`` that is ``−offset`` plus a sliver, which
    the checkpoint's 16-bit dtype cannot hold. ``s ≤ 2|offset + w| / offset`` keeps
    ``|offset + w'| ≥ offset/2``: the stored norm is then within twice its own rounding."""
    return torch.minimum(s, (2 * (offset + w).abs() / offset).clamp(min=1.0))


def _tied_max(v: torch.Tensor, tie: Tie | None) -> torch.Tensor:
    """Per input channel → per tied (KV) channel: the max over each tied set."""
    if tie is None:
        return v
    idx = tie.index(v.numel(), v.device)
    out = torch.zeros(v.numel() // tie.heads_per_kv, dtype=v.dtype, device=v.device)
    return out.scatter_reduce_(0, idx, v, reduce="amax", include_self=False)


class SmoothQuant(Transform):
    name = "smoothquant"
    description = "SmoothQuant: activation outliers migrated into the weights (s = max|X|^a / max|W|^(1-a)), folded"
    Options = SmoothQuantOptions
    needs_calibration = True

    options: SmoothQuantOptions

    def check_format(self, fmt: Format) -> str | None:
        if fmt.block_width != 1:
            return f"SmoothQuant scales input channels one by one; {fmt.spec} rounds {fmt.block_width} columns jointly"
        return None

    @torch.no_grad()
    def transform_block(self, block: Block, ctx: QuantContext) -> None:
        o = self.options
        if block.inputs is None:
            raise QFError("smoothquant needs calibration inputs; the run has none (use --calibrator text)")
        groups = [g for g in block_groups(block, "smoothquant") if o.folds == "all" or g.group.prev_kind == "norm"]
        heads = [g.members[0] for g in groups]
        stats = collect_input_stats(block, heads, want=("absmax",), device=ctx.device, share=False)
        samples = _samples(block, heads, o.search_tokens) if o.search else {}
        config = ctx.source.config if ctx.source is not None else None
        stored = ctx.source.storage_dtype if ctx.source is not None else torch.float32
        for g in groups:
            st = stats[g.members[0]]
            if st.count == 0:
                ctx.note(f"smoothquant: {block.full_name(g.members[0])} saw no calibration token: not smoothed")
                continue
            lins = [block.linear(m) for m in g.members]
            point = fold_point(block, g.group, lins[0].in_features, config, o.fold_gqa)
            if isinstance(point, str):
                ctx.note(f"smoothquant: group {', '.join(g.group.linears)} not smoothed: {point}")
                continue
            x_max = _tied_max(st.absmax.float().to(ctx.device), point.tie)
            w_max = _tied_max(torch.stack([lin.weight.detach().abs().amax(0).float().to(ctx.device)
                                           for lin in lins]).amax(0), point.tie)
            alpha = _search(block, g, samples[g.members[0]], x_max, w_max, point.tie, o) if o.search else o.alpha
            s = smoothing_scale(x_max, w_max, alpha)
            offset = block.architecture.norm_weight_offset
            if point.kind == "norm" and offset and stored != torch.float32:
                s = _cap_for_offset_norm(s, point.prev.weight.detach().float().to(s.device), offset)
            scale = point.tie.expand(s) if point.tie is not None else s
            dev = lins[0].weight.device
            apply_fold(point, lins, scale.to(dev), s.to(dev), block.architecture.norm_weight_offset, stored,
                       quantized_prev=g.group.prev in block.formats)
            for m, lin in zip(g.members, lins, strict=True):
                if m not in block.formats:  # kept in float: what the artifact holds
                    lin.weight.copy_(lin.weight.to(stored).to(lin.weight.dtype))


def _samples(block: Block, names: list[str], tokens: int) -> dict[str, torch.Tensor]:
    """Up to ``tokens`` input rows of each named linear, from the first calibration batches."""
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    kept = dict.fromkeys(names, 0)

    def seen(name: str, x: torch.Tensor) -> None:
        if kept[name] < tokens:
            x2 = x.reshape(-1, x.shape[-1])[: tokens - kept[name]].float()
            rows[name].append(x2)
            kept[name] += x2.shape[0]
    with block.capture_inputs(names, seen):
        block.run()
    return {n: torch.cat(r) if r else torch.zeros(0, block.linear(n).in_features) for n, r in rows.items()}


def _w8a8_error(x: torch.Tensor, ws: list[torch.Tensor], scale: torch.Tensor, formats: list[Format | None],
                acts: list[ActQuant | None]) -> float:
    """``Σ ‖X Wᵀ − q(X/s) q(W·s)ᵀ‖²`` over the group's linears."""
    total = 0.0
    xs = x / scale
    for w, fmt, act in zip(ws, formats, acts, strict=True):
        wq = w * scale
        if fmt is not None:
            wq = fmt.quantize(wq).dequantize()
        xq = xs
        if act is not None:
            xq = act.fake_quant(xs, None if act.dynamic else act.scale_for(xs.abs().amax().reshape(1)))
        total += float((x @ w.T - xq @ wq.T).square().sum())
    return total


def _search(block: Block, g: BlockGroup, x: torch.Tensor, x_max: torch.Tensor, w_max: torch.Tensor,
            tie: Tie | None, o: SmoothQuantOptions) -> float:
    """The ``α`` of the grid with the smallest W8A8 output error of the group on ``x``."""
    ws = [block.linear(m).weight.detach().float().to(x.device) for m in g.members]
    formats = [block.formats.get(m) for m in g.members]
    acts = [block.input_quant.get(m) for m in g.members]
    best, best_alpha = float("inf"), o.alpha
    for i in range(o.alpha_grid + 1):
        alpha = i / o.alpha_grid
        s = smoothing_scale(x_max, w_max, alpha)
        scale = (tie.expand(s) if tie is not None else s).to(x.device)
        err = _w8a8_error(x, ws, scale, formats, acts)
        if err < best:
            best, best_alpha = err, alpha
    return best_alpha

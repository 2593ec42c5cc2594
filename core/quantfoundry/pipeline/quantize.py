"""The work on one block (or on the whole model) of a run: the recipe's stages, the checks of
what they return, the tensors each block gives the exporter, and the tensors outside the
blocks that the plan quantizes."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from ..errors import QFError
from ..model.experts import calibration_tokens, expert_calibration, expert_lists, routed_token_counts
from ..model.materialize import set_parameter, tied_source
from ..model.source import ModelSource
from ..roles.block import Block, QuantContext
from ..roles.format import QuantizedWeight
from ..roles.kernel import QuantLinear
from ..roles.plan import QuantPlan
from ..roles.quantizer import Quantizer, Transform
from ..toolkit.kernels import select_kernels, swap_in
from ..toolkit.stats import collect_input_stats
from .journal import Entry


def run_stages(transforms: list[Transform], quantizer: Quantizer, block: Block,
               ctx: QuantContext) -> dict[str, QuantizedWeight]:
    """The transforms in order, then the rounding quantizer; its weights checked against the
    plan and moved to the run's device."""
    for stage in transforms:
        block.outputs = None
        with torch.no_grad():
            result = stage.transform_block(block, ctx)
        if result is not None:
            raise QFError(f"transform {stage.name!r} returned {type(result).__name__}; a transform changes "
                          "the block's float weights in place and returns None")
    block.outputs = None  # only the rounding stage's run counts
    with torch.no_grad():
        out = quantizer.quantize_block(block, ctx) or {}
    check_result(quantizer, block, out)
    return {rel: qw.to(ctx.device) for rel, qw in out.items()}


def run_block(transforms: list[Transform], quantizer: Quantizer, block: Block, ctx: QuantContext, *,
              routing: str = "fill", min_tokens: int = 32) -> dict[str, QuantizedWeight]:
    """:func:`run_stages` on ``block``; in a mixture of experts with calibration inputs, the
    experts get calibration tokens as ``routing`` says (:func:`expert_calibration`), and an
    expert that would still see fewer than ``min_tokens`` tokens is left out of the stages and
    rounded to nearest on its planned format afterwards (with a note naming it)."""
    calibrated = block.inputs is not None and (quantizer.needs_calibration or
                                               any(t.needs_calibration for t in transforms))
    lists = expert_lists(block.module) if calibrated else {}
    if not lists:
        return run_stages(transforms, quantizer, block, ctx)
    total = calibration_tokens(block)
    # with ``all`` every expert sees every token: no routing pass is needed to know it
    routed = {name: torch.full((len(m),), total) for name, m in lists.items()} if routing == "all" \
        else routed_token_counts(block)
    few: dict[str, int] = {}
    for name, counts in routed.items():
        for e, n in enumerate(counts.tolist()):
            seen = total if routing == "all" else max(n, min(min_tokens, total)) if routing == "fill" else n
            if seen < min_tokens:
                few[f"{name}.{e}"] = seen
    planned = dict(block.formats)
    fallback = {rel: fmt for rel, fmt in planned.items() if any(rel.startswith(f"{x}.") for x in few)}
    block.formats = {rel: fmt for rel, fmt in planned.items() if rel not in fallback}
    try:
        with expert_calibration(block.module, routing, min_tokens, total):
            out = run_stages(transforms, quantizer, block, ctx)
    finally:
        block.formats = planned
    for rel, fmt in fallback.items():
        w = block.linear(rel).weight
        out[rel] = fmt.quantize(w.to(ctx.device, torch.float32), ctx.importance.get(block.full_name(rel)))
    for expert, seen in few.items():
        ctx.note(f"{block.full_name(expert)} saw {seen} calibration token(s) (fewer than --expert-min-tokens "
                 f"{min_tokens}, routing {routing}): rounded to nearest, not by {quantizer.name}")
    return out


def check_result(stage: Quantizer, block: Block, out: dict[str, QuantizedWeight]) -> None:
    missing = sorted(set(block.formats) - set(out))
    if missing:
        raise QFError(f"quantizer {stage.name!r} returned no weight for {block.prefix}.{missing[0]} "
                      f"(and {len(missing) - 1} more); a rounding stage must quantize every planned linear")
    for name, qw in out.items():
        want = block.formats.get(name)
        if want is None:
            raise QFError(f"quantizer {stage.name!r} quantized {block.prefix}.{name}, which the plan keeps in float")
        if qw.format != want:
            raise QFError(f"quantizer {stage.name!r} rounded {block.prefix}.{name} to {qw.format.spec}, "
                          f"but the plan (and the exporter) want {want.spec}")
        if tuple(qw.shape) != tuple(block.linear(name).weight.shape):
            raise QFError(f"quantizer {stage.name!r} returned shape {qw.shape} for {block.prefix}.{name}")


def set_dequantized(block: Block, out: dict[str, QuantizedWeight]) -> None:
    """Every quantized linear of ``block`` computes with exactly its dequantized weight (the
    numerics of the reference kernel), so the block's run gives the next block's inputs."""
    for rel, qw in out.items():
        lin = block.linear(rel)
        lin.weight.data = qw.dequantize(lin.weight.dtype).to(lin.weight.device)


def swap_in_block(block: Block, out: dict[str, QuantizedWeight], kernel: str | None,
                  kernel_options: dict[str, str] | None) -> None:
    for rel, qw in out.items():
        swap_in(block.module, rel, qw, select_kernels(qw.format, qw.device, kernel, kernel_options))


@torch.no_grad()
def block_importance(block: Block) -> dict[str, torch.Tensor]:
    """Mean of the squared inputs, per input channel, of every planned linear of ``block``
    over all calibration tokens (llama.cpp's imatrix: ``in_sum2 / counts``), in float32."""
    names = list(block.formats)
    stats = collect_input_stats(block, names, want=("sq_sum",))
    return {block.full_name(n): stats[n].sq_mean for n in names}


def module_entries(model: nn.Module, module: nn.Module, prefix: str, source: ModelSource,
                   quantized: dict[str, QuantizedWeight] | None = None) -> list[Entry]:
    """What the exporter gets for ``module`` (named ``prefix`` in the model), in order: each
    ``QuantLinear``'s quantized weight and bias, every other parameter as it is in memory (or its
    quantized weight from ``quantized``, by tensor name). A parameter the checkpoint does not
    have is an error unless it is a tied alias (an output head tied to the embeddings)."""
    quantized = quantized or {}
    out: list[Entry] = []
    for name, sub in module.named_modules():
        full = ".".join(p for p in (prefix, name) if p)
        if isinstance(sub, QuantLinear):
            qw = quantized.get(f"{full}.weight")
            out.append((f"{full}.weight", qw if qw is not None else sub.qweight))
            if sub.bias is not None:
                out.append((f"{full}.bias", sub.bias.detach()))
            continue
        for pname, p in sub.named_parameters(recurse=False):
            key = f"{full}.{pname}" if full else pname
            if key in quantized:
                out.append((key, quantized[key]))
            elif key in source.tensor_info:
                out.append((key, p.detach()))
            elif tied_source(model, source, key) is None:
                raise QFError(f"{key} is a parameter of the quantized model but not a tensor of the checkpoint "
                              "(nor tied to one), so no artifact would hold it; a stage must not add parameters")
    return out


def stored(source: ModelSource, name: str, value: torch.Tensor | QuantizedWeight) -> torch.Tensor | QuantizedWeight:
    """What the exporter writes for an entry: a quantized weight as it is, a float tensor in
    the checkpoint's dtype for that tensor, on the CPU."""
    if isinstance(value, QuantizedWeight):
        return value.to("cpu")
    return value.to("cpu", stored_dtype(source, name))


def stored_dtype(source: ModelSource, name: str) -> torch.dtype:
    info = source.tensor_info.get(name)
    return info[0] if info is not None and info[0].is_floating_point else source.storage_dtype


def restore_block(block: Block, entries: list[Entry], device: torch.device) -> dict[str, QuantizedWeight]:
    """Put a journaled block back: its float tensors as recorded, each quantized linear holding
    its dequantized weight (as :func:`set_dequantized`). Returns the quantized weights by
    block-relative linear name."""
    out: dict[str, QuantizedWeight] = {}
    for name, value in entries:
        rel = name[len(block.prefix) + 1:]
        if isinstance(value, QuantizedWeight):
            out[rel.removesuffix(".weight")] = value.to(device)
        else:
            set_parameter(block.module, rel, nn.Parameter(value.to(device), requires_grad=False))
    set_dequantized(block, out)
    return out


@torch.no_grad()
def quantize_outside_blocks(
    model: nn.Module | None, source: ModelSource, plan: QuantPlan, ctx: QuantContext, *,
    kernel_name: str | None = None, kernel_options: dict[str, str] | None = None,
) -> dict[str, QuantizedWeight]:
    """Round-to-nearest, in its planned format, every tensor outside the decoder blocks that the
    plan quantizes (an exporter's rule such as llama.cpp's Q6_K ``output.weight`` / Q4_K
    ``token_embd``), with its importance when there is one. Quantizers work on blocks; these
    tensors get the format's own rounding, once, and the in-memory ``model`` (when its outside
    parameters are materialized) gets the same values: a linear becomes a ``QuantLinear``, an
    embedding keeps its ``nn.Parameter`` (and so its ties) with the dequantized values.
    Returns the quantized weights by tensor name (``lm_head.weight``) for the exporter."""
    out: dict[str, QuantizedWeight] = {}
    linears = source.linear_shapes()
    planned = {n: e.format for n, e in plan.quantized().items()
               if source.block_index(n) is None and e.format is not None}
    if planned:
        ctx.note("outside the decoder blocks, rounded to nearest in the planned format: " +
                 ", ".join(f"{n} {fmt.spec}" for n, fmt in planned.items()))
    for name, fmt in planned.items():
        weight_name = f"{name}.weight"
        module = _materialized(model, name)
        if module is not None:
            w = module.weight.detach()
        elif source.has_tensor(weight_name):
            w = source.read([weight_name])[weight_name]
        else:
            raise QFError(f"the plan quantizes {name}, but the checkpoint has no {weight_name}")
        qw = replace(fmt.quantize(w.to(ctx.device, torch.float32), dict.get(ctx.importance, name)),  # not the quantizer's read
                     dtype=stored_dtype(source, weight_name))
        out[weight_name] = qw
        if module is None or model is None:
            continue
        if name in linears:
            swap_in(model, name, qw, select_kernels(fmt, ctx.device, kernel_name, kernel_options))
        else:  # an embedding: same Parameter object, so a tied output head follows
            module.weight.data = qw.dequantize(module.weight.dtype).to(module.weight.device)
    return out


def _materialized(model: nn.Module | None, name: str) -> nn.Module | None:
    if model is None:
        return None
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None
    weight = getattr(module, "weight", None)
    return module if isinstance(weight, torch.Tensor) and weight.device.type != "meta" else None

"""The block-by-block loop: materialize a block, let the quantizer stages work on it, run it
to produce the next block's inputs, hand its tensors to the exporter, release it."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import QFError
from ..roles.exporter import Exporter
from ..roles.format import QuantizedWeight
from ..roles.plan import QuantPlan
from ..roles.quantizer import Block, BlockInputs, QuantContext, Quantizer
from .kernels import select_kernel, swap_in
from .materialize import materialize, release
from .source import ModelSource


@dataclass
class BlockwiseResult:
    #: the quantized weights still in memory (every block's when ``keep``, else none)
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)
    seconds_per_block: list[float] = field(default_factory=list)


def _check_result(stage: Quantizer, block: Block, out: dict[str, QuantizedWeight]) -> None:
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


def run_blocks(
    model: nn.Module, source: ModelSource, plan: QuantPlan, stages: list[Quantizer], ctx: QuantContext, *,
    inputs: BlockInputs | None, layer_kwargs: dict[int, list[dict[str, Any]]] | None,
    exporter: Exporter | None, keep: bool, dtype: torch.dtype, kernel_name: str | None = None,
    kernel_options: dict[str, str] | None = None,
    on_block: Callable[[int, int, float], None] | None = None,
    collect_importance: bool = False,
) -> BlockwiseResult:
    """Quantize every decoder block in order. Peak memory: one block plus calibration inputs
    (plus the quantized blocks already done when ``keep`` is set for in-memory evaluation).
    With ``collect_importance`` each block first runs in float on its calibration inputs and
    ``ctx.importance`` gets every planned linear's mean squared input per channel."""
    arch = source.architecture
    layers: nn.ModuleList = model.get_submodule(arch.layers)
    result = BlockwiseResult()
    device = ctx.device
    hidden = inputs.hidden if inputs is not None else None
    for index in range(len(layers)):
        t0 = time.perf_counter()
        prefix = source.layer_prefix(index)
        module = layers[index]
        materialize(model, module, prefix, source, dtype=dtype, device=device)
        formats = {}
        for full, entry in plan.quantized().items():
            if full.startswith(prefix + "."):
                formats[full[len(prefix) + 1:]] = entry.format
        block_inputs = None
        if hidden is not None and layer_kwargs is not None:
            block_inputs = BlockInputs(hidden=hidden, kwargs=layer_kwargs.get(index, []))
        block = Block(index, prefix, module, arch, formats, block_inputs)
        if collect_importance and block_inputs is not None:
            ctx.importance.update(collect_block_importance(block))
        out: dict[str, QuantizedWeight] = {}
        for stage in stages:
            with torch.no_grad():
                out = stage.quantize_block(block, ctx) or {}
            if not stage.rounds and out:
                raise QFError(f"transform stage {stage.name!r} returned quantized weights; only the last stage rounds")
        if stages:
            _check_result(stages[-1], block, out)
        for rel, qw in out.items():
            qw = qw.to(device)
            kernel = select_kernel(qw.format, device, kernel_name, kernel_options)
            swap_in(module, rel, qw, kernel)
            result.quantized[f"{prefix}.{rel}"] = qw
        if block_inputs is not None and index + 1 < len(layers):
            hidden = block.run()
        if exporter is not None:
            _export_block(exporter, module, prefix, source)
        if not keep:
            release(module)
            for rel in out:
                del result.quantized[f"{prefix}.{rel}"]
        result.seconds_per_block.append(time.perf_counter() - t0)
        if on_block is not None:
            on_block(index, len(layers), result.seconds_per_block[-1])
    return result


@torch.no_grad()
def collect_block_importance(block: Block) -> dict[str, torch.Tensor]:
    """Mean of the squared inputs, per input channel, of every planned linear of ``block``
    over all calibration tokens (llama.cpp's imatrix: ``in_sum2 / counts``), in float32."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def add(name: str, x: torch.Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1]).double().square().sum(0)
        sums[name] = sums[name] + x2 if name in sums else x2
        counts[name] = counts.get(name, 0) + x.numel() // x.shape[-1]

    with block.capture_inputs(list(block.formats), add):
        block.run()
    return {block.full_name(n): (sums[n] / counts[n]).float() for n in sums}


def run_whole_model(
    model: nn.Module, source: ModelSource, plan: QuantPlan, stage: Quantizer, ctx: QuantContext, *,
    calibration: torch.Tensor | None, exporter: Exporter | None, dtype: torch.dtype,
    kernel_name: str | None = None, kernel_options: dict[str, str] | None = None,
) -> dict[str, QuantizedWeight]:
    """A ``scope = "model"`` quantizer (QAT): the whole float model at once, then export."""
    device = ctx.device
    materialize(model, model, "", source, dtype=dtype, device=device)
    out = stage.quantize_model(model, plan, calibration, ctx) or {}
    want = plan.quantized()
    missing = sorted(set(want) - set(out))
    if missing:
        raise QFError(f"quantizer {stage.name!r} returned no weight for {missing[0]} (and {len(missing) - 1} more)")
    for name, qw in out.items():
        if name not in want or qw.format != want[name].format:
            raise QFError(f"quantizer {stage.name!r} returned {name} as {qw.format.spec}, "
                          f"but the plan wants {want[name].format.spec if name in want else 'float'}")
        qw = qw.to(device)
        swap_in(model, name, qw, select_kernel(qw.format, device, kernel_name, kernel_options))
    if exporter is not None:
        _export_block(exporter, model, "", source)
    return out


def _export_block(exporter: Exporter, module: nn.Module, prefix: str, source: ModelSource) -> None:
    from ..roles.kernel import QuantLinear

    for name, sub in module.named_modules():
        full = ".".join(p for p in (prefix, name) if p)
        if isinstance(sub, QuantLinear):
            exporter.write(f"{full}.weight", sub.qweight.to("cpu"))
            if sub.bias is not None:
                exporter.write(f"{full}.bias", sub.bias.detach().to("cpu", _stored_dtype(source, f"{full}.bias")))
            continue
        for pname, p in sub.named_parameters(recurse=False):
            key = f"{full}.{pname}" if full else pname
            if key not in source.tensor_info:  # a tied alias (lm_head of tied embeddings)
                continue
            exporter.write(key, p.detach().to("cpu", _stored_dtype(source, key)))


def _stored_dtype(source: ModelSource, name: str) -> torch.dtype:
    info = source.tensor_info.get(name)
    return info[0] if info is not None and info[0].is_floating_point else source.storage_dtype

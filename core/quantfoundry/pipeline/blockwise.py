"""The block-by-block loop: materialize a block, let the quantizer stages work on it, run it
to produce the next block's inputs, hand its tensors to the exporter, release it."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ..errors import QFError
from ..roles.exporter import Exporter
from ..roles.format import QuantizedWeight
from ..roles.plan import QuantPlan
from ..roles.quantizer import Block, BlockInputs, QuantContext, Quantizer
from .kernels import select_kernel, swap_in
from .materialize import materialize, release, stored_names
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
    (plus the quantized blocks already done when ``keep`` is set for in-memory evaluation),
    and the next block's stored tensors on the CPU, read while this one is quantized.
    With ``collect_importance`` each block first runs in float on its calibration inputs and
    ``ctx.importance`` gets every planned linear's mean squared input per channel."""
    arch = source.architecture
    layers: nn.ModuleList = model.get_submodule(arch.layers)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="qf-prefetch") as pool:
        pin = ctx.device.type == "cuda"

        def read(names: list[str]) -> dict[str, torch.Tensor]:
            tensors = source.read(names, check_finite=True)
            # page-locked, so the copy to the GPU runs asynchronously, not through a bounce buffer
            return {k: v.pin_memory() for k, v in tensors.items()} if pin else tensors

        def prefetch(i: int) -> Future[dict[str, torch.Tensor]]:
            return pool.submit(read, sorted(stored_names(model, layers[i], source.layer_prefix(i), source)))

        return _run_blocks(model, source, plan, stages, ctx, layers, prefetch, inputs=inputs,
                           layer_kwargs=layer_kwargs, exporter=exporter, keep=keep, dtype=dtype,
                           kernel_name=kernel_name, kernel_options=kernel_options, on_block=on_block,
                           collect_importance=collect_importance)


def _run_blocks(
    model: nn.Module, source: ModelSource, plan: QuantPlan, stages: list[Quantizer], ctx: QuantContext,
    layers: nn.ModuleList, prefetch: Callable[[int], Future[dict[str, torch.Tensor]]], *,
    inputs: BlockInputs | None, layer_kwargs: dict[int, list[dict[str, Any]]] | None,
    exporter: Exporter | None, keep: bool, dtype: torch.dtype, kernel_name: str | None,
    kernel_options: dict[str, str] | None, on_block: Callable[[int, int, float], None] | None,
    collect_importance: bool,
) -> BlockwiseResult:
    """The loop of :func:`run_blocks`; the next block's tensors are read from the checkpoint
    (CPU) in a background thread while this one is quantized."""
    arch = source.architecture
    result = BlockwiseResult()
    device = ctx.device
    hidden = inputs.hidden if inputs is not None else None
    pending = prefetch(0) if len(layers) else None
    for index in range(len(layers)):
        t0 = time.perf_counter()
        prefix = source.layer_prefix(index)
        module = layers[index]
        assert pending is not None
        tensors = pending.result()
        pending = prefetch(index + 1) if index + 1 < len(layers) else None
        materialize(model, module, prefix, source, dtype=dtype, device=device, tensors=tensors)
        del tensors
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
            block.outputs = None  # only the last (rounding) stage's run counts
            with torch.no_grad():
                out = stage.quantize_block(block, ctx) or {}
            if not stage.rounds and out:
                raise QFError(f"transform stage {stage.name!r} returned quantized weights; only the last stage rounds")
        if stages:
            _check_result(stages[-1], block, out)
        out = {rel: qw.to(device) for rel, qw in out.items()}
        if block_inputs is not None and index + 1 < len(layers):
            if block.outputs is not None and len(block.outputs) != len(block_inputs.hidden):
                raise QFError(f"quantizer {stages[-1].name!r} gave {len(block.outputs)} output batches for "
                              f"{len(block_inputs.hidden)} input batches of {prefix}")
            hidden = block.outputs if block.outputs is not None else _propagate(block, out)
        for rel, qw in out.items():
            kernel = select_kernel(qw.format, device, kernel_name, kernel_options)
            swap_in(module, rel, qw, kernel)
            result.quantized[f"{prefix}.{rel}"] = qw
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
def _propagate(block: Block, out: dict[str, QuantizedWeight]) -> list[torch.Tensor]:
    """The next block's inputs: this block run with every quantized linear holding its
    dequantized weights (once per block, rather than once per batch inside a kernel)."""
    for rel, qw in out.items():
        lin = block.linear(rel)
        lin.weight.data = qw.dequantize(lin.weight.dtype).to(lin.weight.device)
    return block.run()


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
    missing = sorted(n for n in set(want) - set(out) if source.block_index(n) is not None)
    if missing:
        raise QFError(f"quantizer {stage.name!r} returned no weight for {missing[0]} (and {len(missing) - 1} more)")
    for name, qw in out.items():
        if name not in want or qw.format != want[name].format:
            raise QFError(f"quantizer {stage.name!r} returned {name} as {qw.format.spec}, "
                          f"but the plan wants {want[name].format.spec if name in want else 'float'}")
        qw = qw.to(device)
        swap_in(model, name, qw, select_kernel(qw.format, device, kernel_name, kernel_options))
    rest = QuantPlan({n: e for n, e in want.items() if n not in out})  # outside the blocks
    outside = quantize_outside_blocks(model, source, rest, ctx, kernel_name=kernel_name,
                                      kernel_options=kernel_options)
    if exporter is not None:
        _export_block(exporter, model, "", source, outside)
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
    entries = {n: e for n, e in plan.quantized().items() if source.block_index(n) is None}
    if entries:
        ctx.note("outside the decoder blocks, rounded to nearest in the planned format: " +
                 ", ".join(f"{n} {e.format.spec}" for n, e in entries.items() if e.format is not None))
    for name, entry in entries.items():
        weight_name = f"{name}.weight"
        module = _materialized(model, name)
        if module is not None:
            w = module.weight.detach()
        elif source.has_tensor(weight_name):
            w = source.read([weight_name])[weight_name]
        else:
            raise QFError(f"the plan quantizes {name}, but the checkpoint has no {weight_name}")
        fmt = entry.format
        assert fmt is not None
        qw = replace(fmt.quantize(w.to(ctx.device, torch.float32), ctx.importance.get(name)),
                     dtype=_stored_dtype(source, weight_name))
        out[weight_name] = qw
        if module is None:
            continue
        if name in linears:
            swap_in(model, name, qw, select_kernel(fmt, ctx.device, kernel_name, kernel_options))
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


def _export_block(exporter: Exporter, module: nn.Module, prefix: str, source: ModelSource,
                  quantized: dict[str, QuantizedWeight] | None = None) -> None:
    from ..roles.kernel import QuantLinear

    quantized = quantized or {}
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
            if key in quantized:
                exporter.write(key, quantized[key].to("cpu"))
                continue
            exporter.write(key, p.detach().to("cpu", _stored_dtype(source, key)))


def _stored_dtype(source: ModelSource, name: str) -> torch.dtype:
    info = source.tensor_info.get(name)
    return info[0] if info is not None and info[0].is_floating_point else source.storage_dtype

"""The decoder blocks of a model, one at a time: the public block iterator.

:class:`BlockStream` is what the pipeline's quantization loop walks, and what a planner's
sensitivity pass or a quantizer's test walks the same way::

    stream = BlockStream(source, calibration=ids, device=torch.device("cpu"), dtype=torch.float32)
    for block in stream:
        block.module     # the decoder block with its real weights
        block.inputs     # the hidden states and layer kwargs it is called with
        ...              # measure it, change its weights, quantize it
        stream.finish(block)   # optional: the next block's inputs, from the weights it holds now

Peak memory is one block, the calibration activations and the next block's stored tensors, which
a background thread reads from the checkpoint while the current block is worked on (once it is
built: a block's read tensors are converted and dropped one by one).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from ..distributed import shard as shard_of
from ..errors import QFError
from ..phases import phase
from ..roles.activation import ActQuant
from ..roles.block import Block, BlockInputs
from ..roles.calibrator import CalibrationSet
from ..roles.format import Format
from ..roles.plan import QuantPlan
from .capture import capture_inputs
from .materialize import materialize, materialize_outside_blocks, release, stored_names
from .source import ModelSource


class BlockStream:
    """Iterate the decoder blocks of ``source`` in order, each materialized on ``device``.

    :param model: the model skeleton to fill (default: a new one in ``dtype``); the pipeline
        passes its own so that kept blocks stay in the model it evaluates.
    :param calibration: token ids ``[samples, tokens]``, or a :class:`CalibrationSet` (samples
        of different lengths run in batches of one length each): the embeddings are
        materialized, the first block's inputs captured, and every block gets
        :attr:`Block.inputs`; ``None``: blocks come without inputs.
    :param batch_size: calibration samples per forward batch.
    :param plan: gives each block's :attr:`Block.formats` (default: none).
    :param keep: leave finished blocks materialized (for in-memory evaluation); otherwise a
        block goes back to the ``meta`` device when the next one is requested.
    :param shard: in a run across processes, this rank's share of the calibration batches only
        (:func:`quantfoundry.distributed.shard`); statistics are then reduced over ranks.

    When the next block is requested, the finished one is :meth:`finish`-ed if the consumer has
    not done it: its outputs on its calibration inputs — computed with the weights it holds
    then, or taken from :attr:`Block.outputs` when the consumer set them — become the next
    block's inputs.
    """

    def __init__(self, source: ModelSource, *, model: nn.Module | None = None,
                 calibration: torch.Tensor | CalibrationSet | None = None, batch_size: int = 8,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 plan: QuantPlan | None = None, keep: bool = False, shard: bool = False):
        self.source = source
        self.model = model if model is not None else source.skeleton(dtype)
        self.device = torch.device(device)
        self.dtype = dtype
        self.keep = keep
        self._formats = _formats_by_block(source, plan)
        self._acts = _acts_by_block(source, plan)
        arch = source.architecture
        self.layers: nn.ModuleList = self.model.get_submodule(arch.layers)
        self._hidden: list[torch.Tensor] | None = None
        self._kwargs: dict[int, list[dict]] = {}
        if calibration is not None:
            if _on_meta(self.model, arch.embeddings):
                materialize_outside_blocks(self.model, source, dtype=dtype, device=self.device)
            batches = list(calibration.batches(batch_size) if isinstance(calibration, CalibrationSet)
                           else calibration.split(batch_size))
            batches = [b.to(self.device) for b in (shard_of(batches) if shard else batches)]
            with phase("calibrate"):
                first, self._kwargs = capture_inputs(self.model, self.layers,
                                                     self.model.get_submodule(arch.final_norm), batches)
            self._hidden = first.hidden
        self._finished: set[int] = set()

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def calibrated(self) -> bool:
        """True when blocks come with calibration inputs."""
        return self._hidden is not None

    def __iter__(self) -> Iterator[Block]:
        n = len(self.layers)
        pin = self.device.type == "cuda"
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="qf-prefetch") as pool:
            def read(i: int) -> dict[str, torch.Tensor]:
                names = sorted(stored_names(self.model, self.layers[i], self.source.layer_prefix(i), self.source))
                tensors = self.source.read(names, check_finite=True)
                # page-locked, so the copy to the GPU runs asynchronously, not through a bounce buffer
                return {k: v.pin_memory() for k, v in tensors.items()} if pin else tensors

            pending: Future[dict[str, torch.Tensor]] | None = pool.submit(read, 0) if n else None
            for index in range(n):
                if pending is None:  # pragma: no cover - one future per block, by construction
                    raise RuntimeError("block prefetch lost track of its reads")
                with phase("load"):
                    tensors = pending.result()
                    block = self._block(index, tensors)  # consumes the read tensors one by one
                    # the next block is read while this one is worked on (not while it is built:
                    # the peak is one block and one block's read, not two reads)
                    pending = pool.submit(read, index + 1) if index + 1 < n else None
                del tensors
                yield block
                if index not in self._finished:
                    self.finish(block)
                if not self.keep:
                    release(block.module)

    def _block(self, index: int, tensors: dict[str, torch.Tensor]) -> Block:
        prefix = self.source.layer_prefix(index)
        module = self.layers[index]
        materialize(self.model, module, prefix, self.source, dtype=self.dtype, device=self.device, tensors=tensors)
        inputs = None
        if self._hidden is not None:
            inputs = BlockInputs(hidden=self._hidden, kwargs=self._kwargs.get(index, []))
        return Block(index, prefix, module, self.source.architecture, dict(self._formats.get(index, {})), inputs,
                     input_quant=dict(self._acts.get(index, {})))

    @torch.no_grad()
    def finish(self, block: Block) -> None:
        """Make ``block``'s outputs the next block's inputs: :attr:`Block.outputs` when set,
        else the block run (once) with the weights it holds now. Call it when the block's
        weights are final; calling it again does nothing."""
        if block.index in self._finished:
            return
        self._finished.add(block.index)
        if block.inputs is None or block.index + 1 >= len(self.layers):
            return
        with phase("calibrate"):
            self._advance(block)

    def _advance(self, block: Block) -> None:
        if block.outputs is not None:
            if len(block.outputs) != len(block.inputs.hidden):
                raise QFError(f"{block.prefix} handed over {len(block.outputs)} output batches for "
                              f"{len(block.inputs.hidden)} input batches")
            self._hidden = block.outputs
        else:
            self._hidden = block.run()


def _formats_by_block(source: ModelSource, plan: QuantPlan | None) -> dict[int, dict[str, Format]]:
    """Block index → block-relative linear name → planned format."""
    out: dict[int, dict[str, Format]] = {}
    if plan is None:
        return out
    for full, entry in plan.quantized().items():
        index = source.block_index(full)
        if index is not None and entry.format is not None:
            out.setdefault(index, {})[full[len(source.layer_prefix(index)) + 1:]] = entry.format
    return out


def _acts_by_block(source: ModelSource, plan: QuantPlan | None) -> dict[int, dict[str, ActQuant]]:
    """Block index → block-relative linear name → planned input scheme (W8A8)."""
    out: dict[int, dict[str, ActQuant]] = {}
    for full, act in (plan.activations() if plan is not None else {}).items():
        index = source.block_index(full)
        if index is not None:
            out.setdefault(index, {})[full[len(source.layer_prefix(index)) + 1:]] = act
    return out


def _on_meta(model: nn.Module, names: tuple[str, ...]) -> bool:
    for name in names:
        try:
            weight = model.get_submodule(name).weight
        except AttributeError:
            continue
        if weight.device.type == "meta":
            return True
    return False

"""The plugin toolkit: what two or more methods need, as a small public API.

Plugins import :mod:`quantfoundry` and :mod:`quantfoundry.toolkit` (and
:mod:`quantfoundry.errors`, :mod:`quantfoundry.testing`) only — never ``quantfoundry.pipeline``,
``quantfoundry.builtin`` or another plugin's modules; ``tests/unit/test_layering.py`` keeps it so.

* **input statistics** (:mod:`.stats`): Gram/Hessian, mean ``|x|``, mean ``x²``, absmax per
  input channel, streamed from a block's calibration forward — :func:`collect_input_stats`
  (reduced over the processes of a multi-GPU run);
* **work across processes** (:mod:`quantfoundry.distributed`): each item computed on the rank
  that owns it and handed to all (:func:`split_work`), for the rounding a stage can split;
* **the LDLQ column loop** (:mod:`.ldlq`): damped inverse Cholesky (:func:`inverse_cholesky`),
  GPTQ/LDLQ error feedback over any format, scalar or vector (:func:`ldlq_solve`; weights that
  read one input stacked, :func:`solve_stacked`), the order of a block's stages
  (:func:`input_stages`);
* **Hadamard transforms** (:mod:`.hadamard`): Sylvester × Paley matrices, fast randomized
  Hadamard transforms (QuIP#'s incoherence processing);
* **scale folding** (:mod:`.fold`): a block's input groups (:func:`block_groups`), per-input-channel
  scales into the norm or linear before a group of linears (:func:`fold_point`,
  :func:`apply_fold`), GQA ties (:class:`Tie`);
* **Hugging Face checkpoints** (:mod:`.checkpoint`): config with ``quantization_config``,
  tokenizer files, written shapes, reloading float tensors, one-group-size plans; streaming
  safetensors writers (:mod:`.safetensors_stream`);
* **kernels** (:mod:`.kernels`): choosing a kernel, swapping a linear for a ``QuantLinear``;
* **the model, block by block** (:mod:`quantfoundry.model`): :class:`BlockStream` materializes
  each decoder block with its calibration inputs, for quantizers' tests and planners'
  sensitivity passes; :class:`PassThroughBlock` stands in for a block whose outputs are known;
* **allocation under a budget** (:mod:`.allocate`): one option (bytes, cost) per tensor, the
  Lagrangian method over each tensor's convex hull, for mixed-precision planners (:func:`allocate`);
* **components** (:mod:`.components`): a registered component built by name with checked
  options (:func:`make_component`), for plugins that compose others (``mix``);
* **grids** (:mod:`.grids`): an affine format's code range and whether it takes a zero point
  back (:func:`affine_grid`), for optimisers of the grid (HQQ and its adapter);
* **fake quantization** (:mod:`.fakequant`): a weight mapped onto any format's grid with
  straight-through gradients (clipped where the grid clips), optionally with the grid's step and
  offset learned (LSQ+), and rounded once into a ``QuantizedWeight`` (:class:`FakeQuant`); a
  linear's input under its activation scheme (:func:`fake_quant_input`), for quantization-aware
  training;
* **distillation** (:mod:`.distill`): training parameters of a model towards a reference
  model's next-token distributions — AdamW, warm-up and cosine schedule, gradient accumulation,
  held-out selection of the best state, checkpoints a stopped run resumes from on the same
  trajectory (:func:`distill`, :class:`DistillSettings`, :func:`kl_to_reference`);
* **observers** (:mod:`.observers`): static activation scales from calibration inputs
  (absmax, percentile, MSE), for W8A8 schemes (:class:`~quantfoundry.ActQuant`);
* **progress** (:class:`Progress`): the run's rich progress bar with ETA, for a quantizer's own long pass
  (shown when :attr:`QuantContext.progress` is set);
* **phases** (:mod:`quantfoundry.phases`): where a run's time goes — a component marks its own phases
  (:func:`phase`: a format's ``encode``, a quantizer's ``search``) inside the pipeline's;
* the built-in ``int`` grid (:class:`IntFormat`) and bit packing (:func:`pack_bits`).
"""

from __future__ import annotations

from ..builtin.int_format import MIN_FALLBACK_GROUP, IntFormat, IntOptions
from ..distributed import split_work
from ..files import MANIFEST, read_jsonl, read_manifest, sha256_file, write_json_atomic
from ..model.blocks import BlockStream
from ..model.capture import PassThroughBlock, capture_inputs
from ..model.materialize import load_full_model, materialize, release, set_parameter, tied_source
from ..phases import PhaseClock, measuring, phase
from ..progress import Progress
from ..roles.format import pack_bits, slice_groups, stored_params, unpack_bits
from .allocate import Allocation, allocate, lower_hull
from .checkpoint import (
    PROMPT,
    TOKENIZER_GLOBS,
    CheckpointOptions,
    artifact_skeleton,
    attach_kv_scales,
    copy_tokenizer_files,
    gptqmodel_command,
    is_moe_checkpoint,
    load_float_parameters,
    one_group_plan,
    python_command,
    quant_method_of,
    stored_shapes,
    transformers_command,
    write_hf_config,
)
from .components import make_component
from .distill import DistillResult, DistillSettings, distill, kl_to_reference
from .fakequant import FakeQuant, fake_quant_input
from .fold import BlockGroup, FoldPoint, Tie, apply_fold, block_groups, fold_point
from .grids import AffineGrid, affine_grid
from .kernels import select_kernel, select_kernels, swap_in, triton_interpreting, triton_unavailable
from .ldlq import (
    HessianError,
    LDLQOptions,
    LDLQResult,
    Segment,
    SolvedWeight,
    inverse_cholesky,
    lazy_block_size,
    ldlq_solve,
    prepare_hessian,
    solve_stacked,
)
from .observers import MSEObserver, Observer, PercentileObserver, make_observer
from .safetensors_stream import ShardedSafetensorsWriter, StreamingSafetensorsWriter
from .sequential import input_stages
from .stats import STATISTICS, BlockStats, InputStats, collect_input_stats

__all__ = [
    "Allocation", "allocate", "lower_hull", "MANIFEST", "MIN_FALLBACK_GROUP", "MSEObserver", "Observer", "PercentileObserver", "make_observer", "PhaseClock", "measuring", "phase", "Progress", "PROMPT", "AffineGrid", "affine_grid", "STATISTICS", "TOKENIZER_GLOBS", "BlockGroup", "BlockStats", "BlockStream", "PassThroughBlock", "block_groups", "CheckpointOptions", "DistillResult", "DistillSettings", "FakeQuant", "fake_quant_input", "FoldPoint", "distill", "kl_to_reference",
    "HessianError", "InputStats", "IntFormat", "IntOptions", "LDLQOptions", "LDLQResult", "Segment", "ShardedSafetensorsWriter", "SolvedWeight", "input_stages", "solve_stacked", "split_work",
    "StreamingSafetensorsWriter", "Tie", "apply_fold", "artifact_skeleton", "attach_kv_scales", "capture_inputs", "collect_input_stats",
    "copy_tokenizer_files", "fold_point", "inverse_cholesky", "lazy_block_size", "ldlq_solve",
    "load_float_parameters", "load_full_model", "make_component", "materialize", "one_group_plan", "pack_bits",
    "prepare_hessian", "python_command",
    "quant_method_of", "read_jsonl", "read_manifest", "release", "select_kernel", "select_kernels", "set_parameter", "sha256_file", "triton_interpreting",
    "triton_unavailable",
    "slice_groups", "stored_params", "stored_shapes", "swap_in", "tied_source", "transformers_command", "gptqmodel_command", "is_moe_checkpoint", "unpack_bits", "write_hf_config",
    "write_json_atomic",
]

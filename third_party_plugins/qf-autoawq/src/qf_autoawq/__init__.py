"""qf-autoawq: an adapter over AutoAWQ 0.2.9 (deprecated upstream; AWQ lives on in
llm-compressor) — the quantizer ``autoawq`` runs AutoAWQ's own scale search and clipping on
the run's model with the run's calibration set, then rounds with AutoAWQ's own grid, so qf's
native ``awq`` (plugin qf-awq) can be checked against it on the same model, calibration and
grid, and exported by any qf exporter.

How: the float model (every block materialized; a whole-model quantizer) is wrapped in
AutoAWQ's class for its ``model_type``; ``quantize(..., export_compatible=True)`` searches the
per-channel scales, folds them into the preceding norms/linears of the model (so the float
tensors the artifact keeps are AutoAWQ's) and clips the weights, without packing; each planned
linear is then rounded by AutoAWQ's ``pseudo_quantize_tensor`` (its min/max grid per group,
integer zero point), and its scales and zero points go to the plan's format through
``Format.params_from_affine``, the codes rounded on the stored values. The calibration set goes
in as token ids (AutoAWQ takes lists of ids): the same samples qf's ``awq`` sees.

Two things AutoAWQ 0.2.9 gets wrong with today's stack, worked around here (and only here):
under transformers 5 every layer receives a KV-cache object when ``use_cache`` is on, which
AutoAWQ's replayed layer kwargs would keep appending to — the model runs with ``use_cache``
off; and on the CPU its scale search backs a module's weights up as ``{k: v.cpu()}``, which for a
CPU tensor is the live tensor itself, so every scale it tries is multiplied into the "backup"
and the restored weights are corrupt (measured: a 12 % relative change of pycode-7m's logits
from the scaling alone, which must leave them equal) — while AutoAWQ runs on the CPU,
``Tensor.cpu`` of a CPU tensor returns a copy (:func:`_cpu_backups_copy`).

Serves 4-bit asymmetric integer grids with groups of 32, 64 or 128 along the input dimension
(AutoAWQ's GEMM layout), one grid for the whole model, and the architectures AutoAWQ knows.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass, field
from typing import Any

import quantfoundry as qf
import torch
from quantfoundry import hookimpl
from quantfoundry.toolkit import affine_grid

GROUPS = (32, 64, 128)


@contextlib.contextmanager
def _cpu_backups_copy() -> Any:
    """While AutoAWQ runs on the CPU: ``Tensor.cpu()`` of a CPU tensor returns a copy, so its
    ``{k: v.cpu()}`` weight backups are backups (restored on exit, whatever happens)."""
    real = torch.Tensor.cpu

    def cpu(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.clone() if self.device.type == "cpu" else real(self, *args, **kwargs)

    torch.Tensor.cpu = cpu  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cpu = real  # type: ignore[method-assign]


def _awq() -> Any:
    """AutoAWQ's model map and base class, or a one-line error naming the pip command."""
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")  # its deprecation notice
            from awq.models.auto import AWQ_CAUSAL_LM_MODEL_MAP
    except ImportError:
        raise qf.QFError("the autoawq quantizer needs AutoAWQ: pip install autoawq==0.2.9") from None
    return AWQ_CAUSAL_LM_MODEL_MAP


@dataclass(frozen=True, kw_only=True)
class AutoAWQOptions(qf.Options):
    apply_clip: bool = field(default=True, metadata={"help": "AutoAWQ's weight clipping search after the scales"})
    duo_scaling: bool = field(default=True, metadata={"help": "AutoAWQ's scales from activations and weights"})


class AutoAWQQuantizer(qf.Quantizer):
    name = "autoawq"
    description = "AutoAWQ 0.2.9's own AWQ (adapter, a cross-check of awq; int4, groups 32/64/128)"
    Options = AutoAWQOptions
    scope = "model"
    needs_calibration = True

    options: AutoAWQOptions

    def check_format(self, fmt: qf.Format) -> str | None:
        grid = affine_grid(fmt)
        g = fmt.group_size(4096)
        if grid is None or grid.levels != 16 or not grid.free_zero or g not in GROUPS:
            return (f"AutoAWQ rounds onto 4-bit asymmetric grids with groups of {', '.join(map(str, GROUPS))}, "
                    f"not {fmt.spec} (e.g. int4-g128)")
        _awq()  # the library is there, before any work
        return None

    def quantize_model(self, model: torch.nn.Module, plan: qf.QuantPlan, calibration: torch.Tensor | None,
                       ctx: qf.QuantContext) -> dict[str, qf.QuantizedWeight]:
        models = _awq()
        if calibration is None:
            raise qf.QFError("autoawq needs calibration text (use --calibrator text)")
        wanted = plan.quantized()
        formats = {e.format for e in wanted.values()}
        if len(formats) != 1:
            raise qf.QFError(f"autoawq rounds the whole model onto one grid; the plan has {sorted(f.spec for f in formats)} "
                             "(a width that is no multiple of the group size falls back): choose a group size that "
                             "divides every width")
        fmt = formats.pop()
        model_type = getattr(model.config, "model_type", None)
        if model_type not in models:
            raise qf.QFError(f"AutoAWQ does not know model_type {model_type!r}; it knows {', '.join(sorted(models))}")
        if self.options.apply_clip:
            odd = [n for n, e in wanted.items() if e.shape[0] % 64]
            if odd:
                raise qf.QFError(f"AutoAWQ's clip search needs every linear's output width to be a multiple of 64; "
                                 f"{odd[0]} has {wanted[odd[0]].shape[0]}: pass --quantizer-opt apply_clip=false")
        group = fmt.group_size(4096)
        awq_model = models[model_type](model, model_type, False, model.config, None, None)
        ids = [row.tolist() for row in calibration]
        # transformers 5 hands every layer a KV cache object when use_cache is on; AutoAWQ captures
        # the first layer's kwargs once and replays them, so each forward of its search would
        # append to that cache (attention over stale keys): run the model without a cache
        use_cache = getattr(model.config, "use_cache", None)
        model.config.use_cache = False
        on_cpu = not torch.cuda.is_available()  # AutoAWQ picks its own device: CUDA when there is one
        with warnings.catch_warnings(), (_cpu_backups_copy() if on_cpu else contextlib.nullcontext()):
            warnings.simplefilter("ignore")
            awq_model.quantize(None, quant_config={"zero_point": True, "q_group_size": group, "w_bit": 4,
                                                   "version": "GEMM"},
                               calib_data=ids, max_calib_samples=len(ids), max_calib_seq_len=calibration.shape[1],
                               n_parallel_calib_samples=None, export_compatible=True,
                               apply_clip=self.options.apply_clip, duo_scaling=self.options.duo_scaling)
        model.config.use_cache = use_cache
        out = {}
        for name, entry in wanted.items():
            original = model.get_submodule(name).weight
            weight = original.data.to(ctx.device, torch.float32)
            _, scales, zeros = awq_model.quantizer.pseudo_quantize_tensor(weight)
            like = entry.format.fit(weight)
            params = entry.format.params_from_affine(scales.float(), -zeros.float() * scales.float(), like)
            if params is None:
                raise qf.QFError(f"{name}: {entry.format.spec} takes no fitted values back")
            codes = entry.format.round(weight, params)
            out[name] = qf.QuantizedWeight(entry.format, tuple(weight.shape), original.dtype, entry.format.pack(codes),
                                           params, meta={"autoawq": {"version": "0.2.9"}})
        return out


@hookimpl
def qf_register_quantizers(register):
    register(AutoAWQQuantizer)

"""The conformance kit: base test classes a plugin author subclasses to check a component
against the contracts every other part of QuantFoundry relies on.

::

    # tests/test_conformance.py of a plugin
    from quantfoundry.testing.conformance import FormatConformance, QuantizerConformance

    class TestNF4(FormatConformance):
        spec = "nf4"

    class TestMyQuantizer(QuantizerConformance):
        quantizer = "my-quantizer"
        options = {"steps": "2"}

(``pytest_plugins = ["quantfoundry.testing"]`` in the plugin's ``conftest.py`` provides the
fixtures.) QuantFoundry's own CI runs every class here over every component registered by a
plugin of its repository (``tests/conformance/``), so a new format, kernel or exporter is
checked without anyone remembering to.

What each class checks:

* :class:`FormatConformance` — codes survive ``pack``/``unpack`` byte for byte and decode to the
  dequantized weight; :meth:`~quantfoundry.Format.nbytes` equals the bytes a quantized weight
  holds; bits per weight are derived from it; column slices (``col0``) round and decode as the
  whole tile does; the spec and the JSON form resolve back to an equal format; a bad option is
  one :class:`~quantfoundry.errors.OptionsError`; a shape it refuses has a reason (and a
  fallback that fits, when it offers one); CUDA gives the CPU's codes.
* :class:`QuantizerConformance` — a whole run on a tiny model of every built-in dense architecture
  and two mixtures of experts (Qwen2-MoE, DeepSeek-V3; :data:`ARCHITECTURES`):
  every planned tensor quantized onto its planned format, the written artifact reloaded equal
  to the in-memory model (no ``MISMATCH``), a finite KL to the original.
* :class:`TransformConformance` — the transform, then round-to-nearest, on every built-in
  architecture; the transformed float block computes what the original did (up to rounding
  the tensors kept in float to the checkpoint's dtype).
* :class:`ExporterConformance` — write → reload (``load``) or serve (``engine``) on every
  built-in architecture: the artifact's logits agree with the in-memory model's.
* :class:`KernelConformance` — outputs equal the reference kernel ``torch-dequant``'s for every
  format it serves, with and without bias, for 2-D and 3-D inputs.
* :class:`CalibratorConformance` — samples of the asked count and length at most, ids in the
  vocabulary, a source description and hash, batches without padding, and the same ids again
  from the same options (seed).
* :class:`EvaluatorConformance` — named metrics of numbers or strings on a quantized tiny model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from ..errors import OptionsError
from ..formats import format_from_json, resolve_format
from ..options import parse_options
from ..pipeline.components import make
from ..roles.exporter import Exporter
from ..roles.format import Format, QuantizedWeight
from ..roles.kernel import QuantLinear
from .tiny import DENSE_ARCHS

#: every dense architecture, and two mixtures of experts: a gated shared expert with its router
#: (Qwen2-MoE), latent attention with dense first layers and a stored router bias (DeepSeek-V3);
#: tests/unit/test_moe.py runs every MoE map end to end
ARCHITECTURES = tuple(sorted((*DENSE_ARCHS, "qwen2_moe", "deepseek_v3")))
#: tiny shapes where every built-in format fits (K-quant super-blocks are 256 wide)
WIDE = {"hidden_size": 256, "intermediate_size": 512, "head_dim": 64, "num_attention_heads": 4,
        "num_key_value_heads": 2}
#: a short calibration so that a conformance run takes seconds
CALIBRATION = {"n_samples": "4", "seq_len": "64"}


class _poisoned_memory:
    """Within: every uninitialized tensor (``torch.empty``) is filled with NaN."""

    def __enter__(self) -> None:
        import torch.utils.deterministic as det

        self._was = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                     det.fill_uninitialized_memory)
        torch.use_deterministic_algorithms(True, warn_only=True)
        det.fill_uninitialized_memory = True

    def __exit__(self, *exc: Any) -> None:
        import torch.utils.deterministic as det

        torch.use_deterministic_algorithms(self._was[0], warn_only=self._was[1])
        det.fill_uninitialized_memory = self._was[2]


def _weight(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """A weight with the spread of a trained one: mostly small values, a few large ones."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    w.view(-1)[torch.randint(0, w.numel(), (max(1, w.numel() // 200),), generator=g)] *= 25
    return w


def parametrize_architectures(metafunc: Any) -> None:
    """``pytest_generate_tests`` of :mod:`quantfoundry.testing`: a kit test taking ``arch`` runs
    once per architecture of its class's ``architectures``."""
    cls = metafunc.cls
    if cls is not None and "arch" in metafunc.fixturenames and hasattr(cls, "architectures"):
        metafunc.parametrize("arch", list(cls.architectures))


class FormatConformance:
    """Subclass and set ``spec`` (and ``shape`` when the format needs other widths)."""

    spec: ClassVar[str]
    shape: ClassVar[tuple[int, int]] = (16, 512)

    def format(self) -> Format:
        return resolve_format(self.spec)

    def quantized(self, device: str = "cpu") -> tuple[Format, torch.Tensor, QuantizedWeight]:
        fmt = self.format()
        reason = fmt.check_shape(self.shape)
        if reason:
            raise AssertionError(f"{self.spec} cannot store the test shape {self.shape}: {reason}; set shape")
        w = _weight(self.shape).to(device)
        return fmt, w, fmt.quantize(w)

    def test_codes_survive_packing_and_decode_to_the_dequantized_weight(self) -> None:
        fmt, w, qw = self.quantized()
        codes = fmt.unpack(qw.packed, qw.shape)
        assert codes.shape == (self.shape[0], self.shape[1] // fmt.block_width)
        assert torch.equal(fmt.pack(codes), qw.packed), "pack(unpack(packed)) changed the bytes"
        values = fmt.decode(codes, qw.full_params())
        assert torch.equal(values, qw.dequantize(torch.float32))
        assert torch.isfinite(values).all()
        rel = float((values - w).norm() / w.norm())
        assert rel < 1.0, f"{self.spec}: relative error {rel:.3f} — the round trip is broken"

    def test_nbytes_counts_the_stored_bytes(self) -> None:
        fmt, _, qw = self.quantized()
        assert fmt.nbytes(self.shape) == qw.nbytes()
        assert fmt.bits_per_weight(self.shape) == 8 * qw.nbytes() / (self.shape[0] * self.shape[1])
        for params in (qw.params, qw.tensor_params):
            stored = {k for k in params if not k.startswith("_")}
            assert stored == set(params), "transient parameters (names starting with _) must not be stored"

    def test_column_slices_round_and_decode_as_the_whole_tile(self) -> None:
        fmt, w, qw = self.quantized()
        params = fmt.fit(w)
        codes = fmt.round(w, params)
        bw = fmt.block_width
        g = fmt.group_size(self.shape[1])
        for a, b in ((0, g), (g // 2 // bw * bw, g), (bw, 3 * bw), (g, 2 * g)):
            if a >= b or b > self.shape[1]:
                continue
            part = fmt.round(w[:, a:b], params, a)
            assert torch.equal(part, codes[:, a // bw:b // bw]), f"round of columns [{a}, {b}) differs"
            vals = fmt.decode(codes[:, a // bw:b // bw], params, a)
            assert torch.equal(vals, fmt.decode(codes, params)[:, a:b]), f"decode of columns [{a}, {b}) differs"

    def test_spec_and_json_resolve_to_an_equal_format(self) -> None:
        fmt = self.format()
        assert resolve_format(fmt.spec) == fmt
        assert format_from_json(fmt.to_json()) == fmt
        assert hash(resolve_format(fmt.spec)) == hash(fmt)

    def test_a_bad_option_is_one_clear_error(self) -> None:
        cls = type(self.format())
        with pytest.raises(OptionsError) as info:
            parse_options(cls.Options, {"no_such_option": "1"}, owner=f"format {cls.name!r}")
        assert "\n" not in str(info.value) and "no_such_option" in str(info.value)

    def test_a_refused_shape_has_a_reason_and_a_fitting_fallback(self) -> None:
        fmt = self.format()
        for shape in ((8, self.shape[1] + 1), (8, 24)):
            reason = fmt.check_shape(shape)
            if reason is None:
                continue
            assert isinstance(reason, str) and reason
            fallback = fmt.fallback(shape)
            if fallback is not None:
                assert fallback.check_shape(shape) is None, f"fallback {fallback.spec} does not fit {shape}"

    def test_cuda_gives_the_cpu_codes(self) -> None:
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device: the CPU/CUDA agreement runs on the GPU machine")
        _, _, cpu = self.quantized()
        _, _, gpu = self.quantized("cuda")
        assert torch.equal(cpu.packed, gpu.packed.cpu())
        for k, v in (*cpu.params.items(), *cpu.tensor_params.items()):
            assert torch.equal(v, {**gpu.params, **gpu.tensor_params}[k].cpu()), k


def _run(folder: Path, out: Path | None, **kwargs: Any) -> Any:
    from ..pipeline.run import run

    return run(str(folder), out=out, progress=False, calibrator_options=CALIBRATION, **kwargs)


def _check_run(result: Any, out: Path | None) -> None:
    mismatches = [n for n in result.notes if n.startswith("MISMATCH")]
    assert not mismatches, mismatches
    plan = result.plan.quantized()
    assert plan, "the plan quantized nothing"
    if out is not None:
        check = result.manifest["evaluation"]["artifact_check"]
        assert check is not None and check["ok"], check
    kl = result.metrics["kl"]["kl_mean"]["quantized"]
    assert 0.0 < kl < float("inf")


class QuantizerConformance:
    """Subclass and set ``quantizer`` (and ``options``, ``format``, ``architectures``)."""

    quantizer: ClassVar[str]
    options: ClassVar[dict[str, Any]] = {}
    format: ClassVar[str] = "int4-g32"
    architectures: ClassVar[tuple[str, ...]] = ARCHITECTURES

    def test_a_whole_run_on_every_architecture(self, arch: str, tiny_model: Callable[..., Path],
                                               tmp_path: Path) -> None:
        folder = tiny_model(arch)
        out = tmp_path / "artifact"
        result = _run(folder, out, quantizer=[(self.quantizer, dict(self.options))], format=self.format,
                      evaluators=[("kl", {"max_tokens": "2048"})], keep_model=True)
        _check_run(result, out)
        quantized = {n for n, m in result.model.named_modules() if isinstance(m, QuantLinear)}
        assert quantized == set(result.plan.quantized()), "the in-memory model and the plan disagree"
        for name in quantized:
            qw = result.model.get_submodule(name).qweight
            assert qw.format == result.plan.entries[name].format


class TransformConformance:
    """Subclass and set ``transform`` (and ``options``). A transform must leave the float
    model's function unchanged (an equivalent transformation: scaling, rotation)."""

    transform: ClassVar[str]
    options: ClassVar[dict[str, Any]] = {}
    format: ClassVar[str] = "int4-g32"

    architectures: ClassVar[tuple[str, ...]] = ARCHITECTURES

    def test_the_float_block_computes_what_it_did(self, arch: str, tiny_model: Callable[..., Path]) -> None:
        from ..model.blocks import BlockStream
        from ..model.source import resolve_model
        from ..pipeline.stages import RunRequest, load_and_plan, resolve

        folder = tiny_model(arch)
        state = resolve(RunRequest(model=str(folder), quantizer=[(self.transform, dict(self.options)), ("rtn", {})],
                                   format=self.format, calibrator_options=CALIBRATION, progress=False))
        load_and_plan(state)
        stage = state.transforms[0]
        ids = state.calibration.input_ids if state.calibration is not None else torch.randint(0, 4096, (4, 32))
        stream = BlockStream(resolve_model(folder), calibration=ids, batch_size=2, plan=state.plan)
        for block in stream:
            routed: list[tuple[Any, ...]] = []
            with _routing(block.module, routed, record=True):
                before = block.run()
            stage.transform_block(block, state.ctx)
            with _routing(block.module, routed, record=False):  # the same experts for every token
                after = block.run()
            for a, b in zip(after, before, strict=True):
                # tensors kept in float are rounded to the checkpoint's dtype (bf16 here: 2⁻⁸), as the
                # artifact holds them; a wrong transformation is off by O(1)
                rel = float((a - b).norm() / b.norm())
                assert rel < 5e-3, f"{block.prefix}: the transformed block's output moved by {rel:.2e} (relative)"

    def test_then_round_to_nearest(self, arch: str, tiny_model: Callable[..., Path], tmp_path: Path) -> None:
        out = tmp_path / "artifact"
        result = _run(tiny_model(arch), out, quantizer=[(self.transform, dict(self.options)), ("rtn", {})],
                      format=self.format, evaluators=[("kl", {"max_tokens": "2048"})])
        _check_run(result, out)
        assert result.manifest["quantizer"][0]["role"] == "transform"


@contextmanager
def _routing(module: torch.nn.Module, calls: list[tuple[Any, ...]], *, record: bool) -> Iterator[None]:
    """Record the routing (each MoE layer's call arguments) of a block's run, or replay it: a
    router kept in float is rounded to the checkpoint's dtype after a fold, and a token whose
    top experts are near-tied may flip to another — the check is about the folds, which the
    float64 test of tests/unit/test_fold.py covers routers included."""
    from ..model.experts import expert_lists

    queue = calls if record else list(calls)

    def hook(_m: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if record:
            queue.append(args[1:])
            return None
        return (args[0], *queue.pop(0))

    handles = [m.register_forward_pre_hook(hook) for m in expert_lists(module).values()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class PlannerConformance:
    """Subclass and set ``planner`` (and ``options``, ``exporter``, ``format``): a plan halfway
    between the smallest and the largest the exporter's candidates allow fits its budget, is
    written, reloaded and agrees with the in-memory model; a budget below the smallest is refused
    before anything is written."""

    planner: ClassVar[str]
    options: ClassVar[dict[str, Any]] = {}
    exporter: ClassVar[str] = "qf"
    format: ClassVar[str | None] = "int4-g32"
    architectures: ClassVar[tuple[str, ...]] = ARCHITECTURES

    def _kwargs(self) -> dict[str, Any]:
        return {"exporter": self.exporter, "format": self.format, "planner": self.planner,
                "planner_options": dict(self.options)}

    def _bounds(self, folder: Path) -> tuple[int, int]:
        """The smallest and the largest artifact the exporter's candidates allow."""
        from ..model.source import resolve_model
        from ..pipeline.stages import RunRequest, plan_request, resolve

        state = resolve(RunRequest(model=str(folder), target_bpw=32, calibrator_options=CALIBRATION, progress=False,
                                   **self._kwargs()))
        source = resolve_model(str(folder))
        request = plan_request(state, source, state.exporter.plan(source, state.requested))
        return request.smallest_bytes(), request.largest_bytes()

    def test_a_plan_within_its_budget(self, arch: str, tiny_model: Callable[..., Path], tmp_path: Path) -> None:
        folder = tiny_model(arch, **WIDE)
        low, high = self._bounds(folder)
        assert low < high, "the exporter offered no choice"
        out = tmp_path / "artifact"
        result = _run(folder, out, target_size=(low + high) // 2, evaluators=[("kl", {"max_tokens": "2048"})],
                      keep_model=True, **self._kwargs())
        _check_run(result, out)
        planner = result.manifest["planner"]
        assert planner["name"] == self.planner
        assert low <= planner["planned_bytes"] <= (low + high) // 2 == planner["budget_bytes"]
        for name, entry in result.plan.quantized().items():
            module = result.model.get_submodule(name)
            if isinstance(module, QuantLinear):
                assert module.qweight.format == entry.format, name

    def test_a_budget_below_the_smallest_plan_is_refused(self, tiny_model: Callable[..., Path],
                                                         tmp_path: Path) -> None:
        from ..errors import UsageError

        folder = tiny_model("llama", **WIDE)
        low, _ = self._bounds(folder)
        out = tmp_path / "artifact"
        with pytest.raises(UsageError):
            _run(folder, out, target_size=low - 1, evaluators=[], **self._kwargs())
        assert not out.exists()


class ExporterConformance:
    """Subclass and set ``exporter`` (and ``options``, ``format``: default, the exporter's)."""

    exporter: ClassVar[str]
    options: ClassVar[dict[str, Any]] = {}
    format: ClassVar[str | None] = None
    architectures: ClassVar[tuple[str, ...]] = ARCHITECTURES

    def test_write_then_reload_or_serve(self, arch: str, tiny_model: Callable[..., Path], tmp_path: Path) -> None:
        exp = make("exporter", self.exporter, self.options)
        overridden = type(exp).load is not Exporter.load
        assert exp.can_load == overridden, "can_load must be True exactly when the exporter implements load()"
        if not exp.can_load:
            assert type(exp).engine is not Exporter.engine, "an exporter must reload (load) or serve (engine) its artifacts"
        folder = tiny_model(arch, **WIDE)
        out = tmp_path / "artifact"
        result = _run(folder, out, exporter=self.exporter, exporter_options=dict(self.options), format=self.format,
                      evaluators=[("kl", {"max_tokens": "2048"})])
        _check_run(result, out)
        assert result.manifest["evaluation"]["artifact"]["path"] == str(out)


#: error bound of a kernel's output per input dtype, relative to ``|x| · |W|ᵀ + |b|`` (the sum of
#: the magnitudes of the products): float32 accumulates exactly enough; bfloat16/float16 round
#: the weight (2^-9 / 2^-12) and the output (the same) once each, with room for the accumulator
KERNEL_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}
#: Hopper's fp8 tensor cores add e4m3 products in a narrower accumulator than float32 (about 14
#: bits kept: DeepSeek-V3's report, §3.3.2), as every engine's fp8 GEMM on them does: fp8 × fp8
#: products on CUDA are held to this fraction of the sum of |products|, not float32's
FP8_MMA_TOLERANCE = 2.0 ** -10


class KernelConformance:
    """Subclass and set ``kernel`` and ``specs`` (formats it should serve).

    Each served spec, weight shape it can store (``shapes``: tile multiples and not), input dtype
    (``dtypes``) and token count (1, 5, 2 × 7, 33; fresh random inputs each) is checked against
    the float64 product of the dequantized weight, within :data:`KERNEL_TOLERANCE`, and against
    the reference kernel ``torch-dequant``. Outputs are computed with uninitialized memory
    filled with NaN (``torch.utils.deterministic.fill_uninitialized_memory``), so an output
    element the kernel never writes fails the check."""

    kernel: ClassVar[str]
    options: ClassVar[dict[str, Any]] = {}
    specs: ClassVar[tuple[str, ...]] = ("int4-g128", "int8")
    devices: ClassVar[tuple[str, ...]] = ("cpu", "cuda")
    shapes: ClassVar[tuple[tuple[int, int], ...]] = ((96, 256), (40, 512))
    dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float32, torch.bfloat16)

    def _device(self, device: str) -> torch.device:
        """``device``, or a skip where the kernel does not serve it or this machine has none."""
        if device not in self.devices:
            pytest.skip(f"{self.kernel} does not serve {device}")
        if device == "cuda" and not torch.cuda.is_available():
            pytest.skip("no CUDA device: the kernel's CUDA path is checked on the GPU machine")
        return torch.device(device)

    @pytest.mark.parametrize("device", ["cpu", "cuda"])
    def test_outputs_equal_the_reference_kernel(self, device: str) -> None:
        dev = self._device(device)
        kernel = make("kernel", self.kernel, self.options)
        reference = make("kernel", "torch-dequant", {"cache": "false"})
        served = 0
        g = torch.Generator().manual_seed(5)
        for spec in self.specs:
            fmt = resolve_format(spec)
            if kernel.serves(fmt, dev) is not None:
                continue
            served += 1
            for shape in self.shapes:
                if fmt.check_shape(shape):
                    continue  # a shape the format cannot store
                qw = fmt.quantize(_weight(shape, seed=1)).to(dev)
                w64 = qw.dequantize(torch.float64)
                for b in (None, torch.randn(shape[0], generator=g).to(dev)):
                    for dtype in self.dtypes:
                        for lead in ((1,), (5,), (2, 7), (33,)):
                            x = torch.randn((*lead, shape[1]), generator=g).to(dev, dtype)
                            bb = None if b is None else b.to(dtype)
                            with _poisoned_memory():
                                ours = QuantLinear(qw, bb, kernel)(x)
                            ref = QuantLinear(qw, bb, reference)(x)
                            assert ours.shape == (*lead, shape[0]) and ours.dtype == dtype, (spec, ours.shape, ours.dtype)
                            exact = x.double() @ w64.T + (0 if bb is None else bb.double())
                            mag = x.double().abs() @ w64.abs().T + (0 if bb is None else bb.double().abs())
                            bound = KERNEL_TOLERANCE[dtype] * mag + 1e-6
                            for name, y in (("kernel", ours), ("reference kernel", ref)):
                                err = (y.double() - exact).abs()
                                assert bool((err <= bound).all()), (
                                    f"{self.kernel} {spec} {shape} {dtype} {lead}: {name} off the float64 product by "
                                    f"{float((err / bound).max()):.2f}x the bound (NaN: an output never written)")
        assert served, f"{self.kernel} serves none of {self.specs} on {device}"

    #: for kernels that quantize inputs themselves (``Kernel.quantizes_inputs``): ``(format spec,
    #: activation spec)`` pairs checked against the reference kernel's simulation
    act_specs: ClassVar[tuple[tuple[str, str], ...]] = ()

    @pytest.mark.parametrize("device", ["cpu", "cuda"])
    def test_quantized_inputs_equal_the_reference_simulation(self, device: str) -> None:
        if not self.act_specs:  # then QuantLinear quantizes the inputs: the kernel must not do it too
            assert not make("kernel", self.kernel, self.options).quantizes_inputs, \
                f"{self.kernel} quantizes inputs itself: list the (format, activation) pairs it serves in act_specs"
            return
        from ..roles.activation import ActQuant

        dev = self._device(device)
        kernel = make("kernel", self.kernel, self.options)
        assert kernel.quantizes_inputs, f"{self.kernel} lists act_specs but does not set quantizes_inputs"
        reference = make("kernel", "torch-dequant", {"cache": "false"})
        for spec, act_spec in self.act_specs:
            fmt = resolve_format(spec)
            if kernel.serves(fmt, dev) is not None:
                continue
            act = ActQuant.from_spec(act_spec)
            x = torch.randn(3, 9, 256, device=dev) * torch.logspace(-2, 1, 256, device=dev)
            qw = fmt.quantize(_weight((96, 256), seed=2)).to(dev)
            qw.input_quant = act
            if not act.dynamic:
                qw.input_scale = act.scale_for(0.8 * x.abs().amax().reshape(1)).to(dev)  # some values clip
            # what the engine multiplies, in float64: the bound scales with the sum of |products|
            xq = act.fake_quant(x.double(), qw.input_scale)
            w64 = qw.dequantize(torch.float64)
            tol = FP8_MMA_TOLERANCE if (dev.type == "cuda" and act.dtype == "fp8" and fmt.name == "fp8-e4m3") else 1e-5
            for b in (None, torch.randn(96, device=dev)):
                with _poisoned_memory():
                    ours = QuantLinear(qw, b, kernel)(x)
                ref = QuantLinear(qw, b, reference)(x)
                assert ours.shape == (3, 9, 96)
                exact = xq @ w64.T + (0 if b is None else b.double())
                bound = tol * (xq.abs() @ w64.abs().T + (0 if b is None else b.double().abs())) + 1e-5
                for name, y in (("kernel", ours), ("reference kernel", ref)):
                    err = (y.double() - exact).abs()
                    assert bool((err <= bound).all()), (
                        f"{self.kernel} {spec} + {act_spec} on {dev}: {name} off the simulated product by "
                        f"{float((err / bound).max()):.2f}x the bound")


class CalibratorConformance:
    """Subclass and set ``calibrator`` (and ``options``)."""

    calibrator: ClassVar[str]
    options: ClassVar[dict[str, Any]] = {"n_samples": "3", "seq_len": "40"}

    def test_samples_of_the_asked_shape_reproducible_with_a_source(self) -> None:
        from ..data import default_model_path
        from ..model.source import resolve_model

        source = resolve_model(default_model_path(), check_weights=False)
        tok = source.tokenizer()
        calibrator = make("calibrator", self.calibrator, self.options)
        cal = calibrator.load(tok)
        ids = cal.input_ids
        assert ids.dtype == torch.long and ids.dim() == 2 and cal.n_samples >= 1
        opts = {f.name: getattr(calibrator.options, f.name) for f in dataclasses.fields(calibrator.options)}
        lengths = cal.sample_lengths()
        if "n_samples" in opts:
            assert cal.n_samples <= opts["n_samples"]
        if "seq_len" in opts:
            assert int(lengths.max()) <= opts["seq_len"]
        assert int(lengths.min()) >= 1 and cal.n_tokens == int(lengths.sum())
        assert all(int(s.min()) >= 0 and int(s.max()) < len(tok) for s in cal.samples())
        assert cal.source and cal.sha256
        assert sum(b.numel() for b in cal.batches(3)) == cal.n_tokens  # batched without padding
        again = make("calibrator", self.calibrator, self.options).load(tok)  # same options, same seed
        assert torch.equal(again.input_ids, ids) and again.ids_sha256 == cal.ids_sha256, \
            "the same options must give the same token ids"


class EvaluatorConformance:
    """Subclass and set ``evaluator`` (and ``options``)."""

    evaluator: ClassVar[str]
    options: ClassVar[dict[str, Any]] = {}

    def test_named_metrics_on_a_quantized_tiny_model(self, tiny_model: Callable[..., Path]) -> None:
        result = _run(tiny_model("llama"), None, format="int4-g32", evaluators=[(self.evaluator, dict(self.options))])
        metrics = next(iter(result.metrics.values()))
        assert metrics, f"{self.evaluator} returned no metric"
        for name, columns in metrics.items():
            assert isinstance(name, str) and name
            for value in columns.values():
                assert isinstance(value, int | float | str), (name, value)
                if isinstance(value, float):
                    assert value == value, f"{name} is NaN"

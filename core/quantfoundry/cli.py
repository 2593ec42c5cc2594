"""The ``qf`` command line: a thin layer over :func:`quantfoundry.run` and the registries."""

from __future__ import annotations

import dataclasses
import json
import shlex
import signal
import sys
import time
import typing
from pathlib import Path
from typing import Any

import click

from .deploy.targets import target
from .errors import QFError, UsageError
from .memory import mmap_large_allocations
from .options import parse_key_values
from .plugins import get_plugin_manager, reset_plugin_manager

DEFAULT_EVALUATORS = ("perplexity", "size")


def _console():
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 160)


def _split_role_options(pairs: tuple[str, ...], names: list[str], flag: str) -> dict[str, dict[str, str]]:
    """``NAME.key=value`` (or ``key=value`` when only one component is chosen) per component."""
    out: dict[str, dict[str, str]] = {n: {} for n in names}
    for key, value in parse_key_values(pairs, flag=flag).items():
        prefix, dot, rest = key.partition(".")
        if dot and prefix in out:
            out[prefix][rest] = value
        elif len(names) == 1:
            out[names[0]][key] = value
        else:
            raise UsageError(f"{flag} {key}={value}: with several components, prefix the key with one of "
                             f"{', '.join(names)} (e.g. {names[0]}.{key}={value})")
    return out


def _evaluator_specs(names: tuple[str, ...], pairs: tuple[str, ...],
                     default: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    """``--evaluator NAME[:KEY=VALUE,...]`` (inline options tell repeats apart) plus
    ``--evaluator-opt [NAME.]KEY=VALUE`` applied to every evaluator of that name."""
    specs: list[tuple[str, dict[str, Any]]] = []
    for item in names:
        name, colon, inline = item.partition(":")
        opts = parse_key_values(tuple(p for p in inline.split(",") if p), flag=f"--evaluator {name}:") if colon else {}
        specs.append((name, opts))
    specs = specs or default
    unique = list(dict.fromkeys(n for n, _ in specs))
    extra = _split_role_options(pairs, unique, "--evaluator-opt")
    return [(n, {**o, **extra[n]}) for n, o in specs]


class QFClickError(click.ClickException):
    """A QFError shown as one line (``Error: ...``) with exit code 2 (or the error's own:
    130 for a run stopped by a signal)."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


class QFGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except QFError as exc:
            if getattr(exc, "exit_code", 2) != 130 and (_CTRL_C or _caused_by_ctrl_c(exc)):
                # a library turned the KeyboardInterrupt into its own error
                raise QFClickError(INTERRUPTED, 130) from None
            raise QFClickError(str(exc), getattr(exc, "exit_code", 2)) from None
        except KeyboardInterrupt:
            raise QFClickError(INTERRUPTED, 130) from None


INTERRUPTED = "interrupted (Ctrl-C)"
_CTRL_C = False  # set by main()'s SIGINT handler


def _on_ctrl_c(signum: int, frame: Any) -> None:
    global _CTRL_C
    _CTRL_C = True
    raise KeyboardInterrupt


def _caused_by_ctrl_c(exc: BaseException) -> bool:
    """True if a KeyboardInterrupt is among the exceptions that led to ``exc`` (e.g. a Ctrl-C
    while transformers imports a model class lazily, which it reports as an import error)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc.__cause__, exc.__context__]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        todo += [e.__cause__, e.__context__]
    return False


@click.group(cls=QFGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-p", "plugin_flags", multiple=True, metavar="no:NAME",
              help="Block a plugin by plugin or distribution name (repeatable), e.g. -p no:qf-gptq.")
@click.version_option(package_name="quantfoundry", prog_name="qf")
def cli(plugin_flags: tuple[str, ...]) -> None:
    """QuantFoundry: quantize a causal LM with any method, export it for any engine."""
    blocked = []
    for flag in plugin_flags:
        if not flag.startswith("no:") or len(flag) <= 3:
            raise UsageError(f"-p expects no:NAME to block a plugin, got {flag!r}")
        blocked.append(flag[3:])
    if blocked:
        reset_plugin_manager()
    get_plugin_manager(blocked)


@cli.command()
@click.option("--model", default=None, help="Model folder or hub id (default: the embedded pycode-7m).")
@click.option("--quantizer", "quantizers", multiple=True,
              help="Quantizer name; repeat to chain transform stages before the rounding one (default: rtn).")
@click.option("--quantizer-opt", multiple=True, metavar="KEY=VALUE", help="Quantizer option (repeatable).")
@click.option("--format", "format_", default=None, help="Weight format, e.g. int4-g128, int8, int3-g64-sym.")
@click.option("--format-opt", multiple=True, metavar="KEY=VALUE", help="Format option (repeatable).")
@click.option("--exporter", default=None, help="Artifact writer (default: qf).")
@click.option("--exporter-opt", multiple=True, metavar="KEY=VALUE", help="Exporter option (repeatable).")
@click.option("--calibrator", default=None, help="Calibration source (default: text, when needed).")
@click.option("--calibrator-opt", multiple=True, metavar="KEY=VALUE", help="Calibrator option (repeatable).")
@click.option("--evaluator", "evaluators", multiple=True, metavar="NAME[:KEY=VALUE,...]",
              help="Evaluator (repeatable; default: perplexity and size).")
@click.option("--evaluator-opt", multiple=True, metavar="[NAME.]KEY=VALUE", help="Evaluator option (repeatable).")
@click.option("--no-eval", is_flag=True, help="Skip evaluation.")
@click.option("--no-artifact-eval", is_flag=True,
              help="Evaluate only the in-memory model, not the written artifact as well.")
@click.option("--no-cache", is_flag=True, help="Do not read or write the original model's cached results.")
@click.option("--imatrix", is_flag=True, default=None,
              help="Collect an importance matrix from the calibration text and quantize with it (llama.cpp's imatrix).")
@click.option("--activations", default=None, metavar="int8|int8-static|fp8|fp8-static",
              help="The engine quantizes every quantized linear's input (W8A8): int8/fp8 per token at run time, "
                   "or -static with one calibrated scale per tensor (default: the exporter's scheme, else none).")
@click.option("--act-observer", default=None, type=click.Choice(["absmax", "percentile", "mse"]),
              help="How static activation scales are calibrated (default: absmax).")
@click.option("--kv-cache", default=None, metavar="fp8",
              help="The engine keeps keys and values in fp8 with one calibrated scale each per layer (vLLM's fp8 KV "
                   "cache): simulated and written to the artifact.")
@click.option("--target", default=None, metavar="ENGINE",
              help="The engine the artifact is for: llama.cpp, ollama, vllm, tgi, transformers or qlora; picks the "
                   "exporter, format and quantizer it reads best (each overridable by its own flag) and says why.")
@click.option("--planner", default=None,
              help="Choose each tensor's format among the exporter's to fit --target-bpw/--target-size (e.g. kl).")
@click.option("--planner-opt", multiple=True, metavar="KEY=VALUE", help="Planner option (repeatable).")
@click.option("--target-bpw", type=float, default=None,
              help="The planner's budget in bits per weight of the whole model (llama.cpp's convention).")
@click.option("--target-size", default=None, metavar="SIZE",
              help="The planner's budget: bytes of the artifact's tensors (3.9GB, 512MiB; a plain number is bytes).")
@click.option("--kernel", default=None, help="Kernel for in-memory evaluation (default: best available).")
@click.option("--kernel-opt", multiple=True, metavar="KEY=VALUE", help="Kernel option (repeatable).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output folder (default: qf-out/<model>-<quantizer>-<format>).")
@click.option("--device", default=None, help="cpu, cuda or cuda:N (default: cpu).")
@click.option("--dtype", default=None, help="Compute dtype of the block work: float32 (default), bfloat16, float16.")
@click.option("--eval-dtype", default=None,
              help="Dtype evaluation runs in, the original alike: float32 (default), or the deployment's bfloat16/float16.")
@click.option("--batch-size", type=int, default=None, help="Calibration batch size (default: 8).")
@click.option("--devices", default=None, metavar="cuda:0,cuda:1",
              help="Run on several GPUs of this machine: one process per device, the calibration batches sharded "
                   "over them and their statistics reduced; the artifact is the one a one-device run writes "
                   "(cpu,cpu: processes on the CPU). Or start the processes with torchrun -m quantfoundry run.")
@click.option("--expert-routing", default=None, type=click.Choice(["fill", "all", "topk"]),
              help="Mixtures of experts: how calibration tokens reach the experts (statistics only; outputs keep "
                   "the router's top-k): fill (default: an expert routed fewer than --expert-min-tokens also gets "
                   "its most probable tokens), all (every token through every expert), topk (the router alone).")
@click.option("--expert-min-tokens", type=int, default=None,
              help="Mixtures of experts: an expert that sees fewer calibration tokens is rounded to nearest, with "
                   "a note (default: 32).")
@click.option("--threads", type=int, default=None,
              help="CPU threads for the run's work, encoders included (default: torch's, one per core).")
@click.option("--recipe", type=click.Path(path_type=Path), default=None, help="TOML recipe; flags override it.")
@click.option("--allow-pickle", is_flag=True, default=None, help="Allow loading pickled .bin weights.")
@click.option("--trust-remote-code", is_flag=True, default=None, help="Allow the model's own Python code.")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit).")
@click.option("--overwrite", is_flag=True, default=None,
              help="Replace an existing --out folder (only once the new artifact is complete).")
@click.option("--force-requantize", is_flag=True, default=None,
              help="Quantize an already quantized input (a GGUF file, a quantized checkpoint, a qf artifact) after "
                   "dequantizing it; the losses add up, and the report measures only the second rounding.")
@click.option("--resume", is_flag=True, default=None,
              help="Continue an interrupted run from its journal (the same command and inputs).")
@click.option("--dry-run", is_flag=True, help="Show the plan and stop before any quantization.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def run(**kw: Any) -> None:
    """Quantize a model, export it, and report what it cost."""
    from .pipeline.run import run as run_pipeline

    args: dict[str, Any] = {}
    if kw["recipe"] is not None:
        from .recipe import load_recipe

        args.update(load_recipe(kw["recipe"]))
    for flag, key in (("model", "model"), ("format_", "format"), ("exporter", "exporter"),
                      ("calibrator", "calibrator"), ("kernel", "kernel"), ("out", "out"), ("device", "device"),
                      ("dtype", "dtype"), ("eval_dtype", "eval_dtype"), ("batch_size", "batch_size"), ("threads", "threads"),
                      ("allow_pickle", "allow_pickle"),
                      ("trust_remote_code", "trust_remote_code"), ("revision", "revision"),
                      ("overwrite", "overwrite"), ("imatrix", "imatrix"), ("resume", "resume"),
                      ("activations", "activations"), ("act_observer", "act_observer"), ("kv_cache", "kv_cache"),
                      ("planner", "planner"), ("target_bpw", "target_bpw"), ("target_size", "target_size"),
                      ("target", "target"), ("force_requantize", "force_requantize"),
                      ("expert_routing", "expert_routing"), ("expert_min_tokens", "expert_min_tokens"),
                      ("devices", "devices")):
        if kw[flag] is not None:
            args[key] = kw[flag]
    for role in ("format", "exporter", "calibrator", "kernel", "planner"):
        opts = parse_key_values(kw[f"{role}_opt"], flag=f"--{role}-opt")
        if opts:
            args[f"{role}_options"] = {**args.get(f"{role}_options", {}), **opts}
    from_recipe = args.get("quantizer")
    default_stage = [(target(args["target"]).quantizer, {})] if args.get("target") else [("rtn", {})]
    stages = [(q, {}) for q in kw["quantizers"]] or from_recipe or default_stage
    stage_opts = _split_role_options(kw["quantizer_opt"], [n for n, _ in stages], "--quantizer-opt")
    args["quantizer"] = [(n, {**o, **stage_opts[n]}) for n, o in stages]
    if args.get("target") and not kw["quantizers"] and not from_recipe and not any(stage_opts.values()):
        del args["quantizer"]  # the target's quantizer: the pipeline names it, with its reason
    if kw["no_eval"]:
        evals: list[tuple[str, dict[str, Any]]] = []
    else:
        evals = _evaluator_specs(kw["evaluators"], kw["evaluator_opt"],
                                 args.get("evaluators") or [(e, {}) for e in DEFAULT_EVALUATORS])
    args["evaluators"] = evals
    args["artifact_eval"] = not kw["no_artifact_eval"]
    args["cache"] = not kw["no_cache"]
    if kw["dry_run"]:
        _dry_run(args)
        return
    if "out" not in args:
        args["out"] = _default_out(args)
    args["progress"] = not kw["no_progress"] and sys.stderr.isatty()
    from .pipeline.interrupt import RunInterrupted

    try:
        result = run_pipeline(**args)
    except (RunInterrupted, KeyboardInterrupt) as exc:
        again = [a for a in sys.argv[1:] if a != "--resume"]
        if "--out" not in again and "out" in args:  # the default folder was chosen for this run
            again += ["--out", str(args["out"])]
        resume = f"resume: qf {shlex.join([*again, '--resume'])}"
        if isinstance(exc, RunInterrupted):
            raise QFClickError(f"{exc}; {resume}", exc.exit_code) from None
        out = Path(args["out"])
        if any(out.parent.glob(f".{out.name}.partial-*")):
            raise QFClickError(f"{INTERRUPTED}; no artifact was written, the finished blocks are kept; {resume}",
                               130) from None
        raise QFClickError(f"{INTERRUPTED}; nothing was written", 130) from None
    if not _worker():
        _print_summary(result)


def _worker() -> bool:
    """True in a process of a multi-process run other than rank 0 (torchrun's): it prints nothing."""
    from .distributed import env_rank, env_world

    return env_world() > 1 and env_rank() != 0


def _default_out(args: dict[str, Any]) -> Path:
    from .data import default_model_path
    from .formats import resolve_format
    from .model.source import model_name
    from .pipeline.components import exporter_and_format, make

    model = model_name(args.get("model") or default_model_path())
    stages = args.get("quantizer") or [(target(args["target"]).quantizer if args.get("target") else "rtn", {})]
    quant = "+".join(n for n, _ in stages)
    chosen_exporter, chosen_format = args.get("exporter"), args.get("format")
    if args.get("target"):
        t = target(args["target"])
        if chosen_format is None and chosen_exporter in (None, t.exporter):
            chosen_format = t.format
        chosen_exporter = chosen_exporter or t.exporter
    exporter, options, spec, _note = exporter_and_format(chosen_exporter, args.get("exporter_options"),
                                                        chosen_format, args.get("format_options"))
    exp = make("exporter", exporter, options)
    spec = spec or exp.default_format
    label = resolve_format(spec, args.get("format_options")).spec if spec else (exp.artifact_label() or exporter)
    base = Path("qf-out") / f"{model}-{quant}-{label}"
    out, n = base, 1
    while out.exists():  # never replace an earlier run's artifact without --out/--overwrite
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def _dry_run(args: dict[str, Any]) -> None:
    """The run's first two stages without reading weights: every check, then the plan."""
    from .pipeline.stages import RunRequest, load_and_plan, resolve

    state = resolve(RunRequest(**{k: v for k, v in args.items() if k not in ("out", "overwrite", "resume")}))
    load_and_plan(state, dry_run=True)
    _print_plan(state.plan)
    if state.planner is not None:
        for note in state.notes:
            if note.startswith("planner"):
                _console().print(f"  note: {note}", markup=False, highlight=False)


def _print_plan(plan: Any) -> None:
    from rich.table import Table

    table = Table(title="plan")
    acts = any(e.input_quant is not None for e in plan.entries.values())
    for col in ("tensor", "shape", "format", *(("input",) if acts else ()), "note"):
        table.add_column(col)
    for entry in plan.entries.values():
        act = (entry.input_quant.spec if entry.input_quant else "float",) if acts else ()
        table.add_row(entry.name, "x".join(map(str, entry.shape)), entry.format.spec if entry.format else "float",
                      *act, entry.reason)
    _console().print(table)


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float) and v != 0 and abs(v) < 1e-3:
        return f"{v:.4g}"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return "" if v is None else str(v)


def _print_summary(result: Any, *, evaluated: Path | None = None) -> None:
    """The run's (or, with ``evaluated``, an artifact's evaluation's) summary and table."""
    from rich.markup import escape
    from rich.table import Table

    console = _console()
    plan = result.plan
    counts: dict[str, int] = {}
    for e in plan.quantized().values():
        counts[e.format.spec] = counts.get(e.format.spec, 0) + 1
    formats = ", ".join(f"{n} x {s}" for s, n in counts.items())
    if evaluated is None:
        console.print(f"quantized {len(plan.quantized())} tensors ({formats}); "
                      f"{len(plan.kept_float())} kept in float; {len(plan.fallbacks())} fallback(s)")
    else:
        console.print(f"evaluated {evaluated}: it stores {len(plan.quantized())} quantized tensors ({formats}) "
                      f"and {len(plan.kept_float())} in float")
    for note in result.notes:
        console.print(f"  [bold red]{note}[/]" if note.startswith("MISMATCH") else f"  note: {note}",
                      markup=note.startswith("MISMATCH"), highlight=False)
    if result.metrics:
        present = {c for metrics in result.metrics.values() for values in metrics.values() for c in values}
        cols = [c for c in ("original", "quantized", "artifact") if c in present]
        table = Table(title="evaluation")
        table.add_column("metric")
        for col in cols:
            table.add_column(col if col != "quantized" else "quantized (in memory)", justify="right")
        scored: list[str] = []
        for ev, metrics in result.metrics.items():
            labels: dict[str, str] = {}
            for name, values in metrics.items():
                shown = [values.get(c) for c in cols if c in values]
                if shown and all(isinstance(v, str) for v in shown) and len(set(shown)) == 1:
                    labels[name] = shown[0]  # the same text/protocol label in every column: said below
                    continue
                table.add_row(escape(f"{ev}.{name}"), *(escape(_fmt(values.get(c))) for c in cols))
            if "text" in labels:
                how = f", {labels['protocol']} protocol" if "protocol" in labels else ""
                scored.append(f"{ev}: scored on {labels['text']}{how}")
        if scored:
            table.caption = escape("; ".join(scored))
        console.print(table)
    if result.artifact is not None and evaluated is None:
        console.print(f"artifact: {result.artifact}  ({result.seconds:.1f} s{_time_split(result.timings)})")
        if result.run_command:
            console.print(f"run it: {result.run_command}", markup=False, highlight=False, soft_wrap=True)


def _time_split(timings: dict[str, float]) -> str:
    """``: load 0.5, quantize 2.1, encode 0.8, export 0.3`` — the phases that took 5 % or more of the time."""
    total = sum(timings.values())
    shown = [f"{k} {v:.1f}" for k, v in timings.items() if total > 0 and v >= 0.05 * total]
    return ": " + ", ".join(shown) if shown else ""


@cli.command()
@click.option("--options", "options_of", default=None, metavar="NAME", help="Show the options of one component.")
def plugins(options_of: str | None) -> None:
    """List installed plugins, their versions, what each registers, and load errors."""
    from rich.markup import escape
    from rich.table import Table

    from .registry import ROLES

    pm = get_plugin_manager()
    console = _console()
    entries = pm.entries()
    if options_of:
        hits = [e for e in entries if e.name == options_of or options_of in e.aliases]
        if not hits:
            raise UsageError(f"no component named {options_of!r}; `qf plugins` lists them")
        for e in hits:
            console.print(f"{e.role} {e.name} ({e.origin}): {e.description}")
            opts = getattr(e.component, "Options", None)
            if opts is None or not dataclasses.fields(opts):
                console.print("  (no options)")
                continue
            hints = typing.get_type_hints(opts)
            for f in dataclasses.fields(opts):
                console.print(f"  {f.name}: {getattr(hints[f.name], '__name__', hints[f.name])} = {f.default!r}"
                              f"  {f.metadata.get('help', '')}")
        return
    table = Table(title="plugins")
    for col in ("plugin", "version", "registers"):
        table.add_column(col)
    by_plugin: dict[str, list[str]] = {}
    for e in entries:
        by_plugin.setdefault(e.plugin, []).append(f"{_role_label(e)} {e.name}")
    for name in pm.plugin_names():
        dist, version = pm.distribution_of(name)
        table.add_row(name, f"{dist} {version}" if dist else "built-in", ", ".join(by_plugin.get(name, [])) or "-")
    for failure in pm.load_errors:
        table.add_row(f"[red]{failure.name}[/red]", f"{failure.distribution or '?'} {failure.version or ''}",
                      f"[red]failed to {failure.stage}: {failure.error}[/red]")
    console.print(table)
    for notice in pm.notices:
        console.print(f"[yellow]note: {escape(notice)}[/yellow]", highlight=False)
    for role in ROLES:
        names = pm.registry(role).names()
        console.print(f"{role}s: {', '.join(names) or '-'}")


def _role_label(entry: Any) -> str:
    """``transform`` for the transforms registered among the quantizers, else the role."""
    from .roles.quantizer import Transform

    is_transform = isinstance(entry.component, type) and issubclass(entry.component, Transform)
    return "transform" if is_transform else entry.role


@cli.command()
def formats() -> None:
    """List the weight formats with their spec syntax and bits per weight."""
    from rich.table import Table

    from .formats import resolve_format

    pm = get_plugin_manager()
    table = Table(title="formats (bits per weight on a 4096x4096 weight)")
    for col in ("format", "spec syntax", "examples", "description"):
        table.add_column(col)
    for entry in pm.registry("format").entries.values():
        cls = entry.component
        examples = []
        for spec in getattr(cls, "examples", ()) or ():
            fmt = resolve_format(spec)
            examples.append(f"{fmt.spec} {fmt.bits_per_weight((4096, 4096)):.3f}")
        table.add_row(entry.name, cls.spec_help(), ", ".join(examples), cls.description)
    console = _console()
    console.print(table)
    presets = [(e.name, name, text) for e in pm.registry("exporter").entries.values()
               for name, text in e.component.presets()]
    if presets:
        table = Table(title="exporter presets (--format PRESET, or --exporter NAME --exporter-opt type=PRESET)")
        for col in ("exporter", "preset", "description"):
            table.add_column(col)
        for row in presets:
            table.add_row(*row)
        console.print(table)


@cli.command()
@click.option("--device", default=None, help="Device to ask the kernels about (default: cuda if present, else cpu).")
def kernels(device: str | None) -> None:
    """List the kernels: which formats each runs on a device, at which token counts, by priority."""
    import torch
    from rich.table import Table

    from .formats import resolve_format

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: this machine has no CUDA device; use --device cpu")
    pm = get_plugin_manager()
    specs = [spec for e in pm.registry("format").entries.values() for spec in (getattr(e.component, "examples", ()) or ())]
    specs += [s for e in pm.registry("kernel").entries.values() for s in e.component.examples if s not in specs]
    table = Table(title=f"kernels on {dev} (a call runs on the highest-priority kernel that accepts its token count)")
    for col in ("kernel", "priority", "formats it runs", "tokens per call", "description"):
        table.add_column(col)
    entries = sorted(pm.registry("kernel").entries.values(), key=lambda e: -e.component.priority)
    for entry in entries:
        kernel = entry.component()
        served = [spec for spec in specs if kernel.serves(resolve_format(spec), dev) is None]
        why = kernel.serves(resolve_format(kernel.examples[0]), dev) if kernel.examples and not served else None
        table.add_row(entry.name, str(kernel.priority), ", ".join(served) or f"- ({why or 'none of the examples'})",
                      _token_range(kernel, resolve_format(served[0]), dev) if served else "-", entry.component.description)
    _console().print(table)


def _token_range(kernel: Any, fmt: Any, dev: Any) -> str:
    """The token counts (probed at powers of two up to 4096) at which ``kernel`` takes a call."""
    probes = [1 << i for i in range(13)]
    ok = [t for t in probes if kernel.serves(fmt, dev, t) is None]
    if len(ok) == len(probes):
        return "any"
    if not ok:
        reason = kernel.serves(fmt, dev, 1)
        return f"none unless forced ({reason})"
    return f"{ok[0]}-{ok[-1]}" if ok == probes[probes.index(ok[0]):probes.index(ok[-1]) + 1] else ", ".join(map(str, ok))


@cli.command(name="eval")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--original", default=None, help="Original model to compare against (default: the manifest's source).")
@click.option("--evaluator", "evaluators", multiple=True, metavar="NAME[:KEY=VALUE,...]",
              help="Evaluator (repeatable; default: perplexity and size).")
@click.option("--evaluator-opt", multiple=True, metavar="[NAME.]KEY=VALUE", help="Evaluator option (repeatable).")
@click.option("--kernel", default=None, help="Kernel to run the quantized linears.")
@click.option("--device", default="cpu", help="cpu, cuda or cuda:N.")
@click.option("--eval-dtype", default="float32",
              help="Dtype both models run in: float32 (default), or the deployment's bfloat16/float16.")
@click.option("--no-cache", is_flag=True, help="Do not read or write the original model's cached results.")
def eval_(path: Path, original: str | None, evaluators: tuple[str, ...], evaluator_opt: tuple[str, ...],
          kernel: str | None, device: str, eval_dtype: str, no_cache: bool) -> None:
    """Evaluate a written artifact against its original model."""
    from .pipeline.evaluate import evaluate_artifact

    specs = _evaluator_specs(evaluators, evaluator_opt, [(e, {}) for e in DEFAULT_EVALUATORS])
    result = evaluate_artifact(path, original=original, evaluators=specs, kernel=kernel, device=device,
                               dtype=eval_dtype, cache=not no_cache, progress=sys.stderr.isatty())
    _print_summary(result, evaluated=path)


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--device", default="cpu", help="cpu, cuda or cuda:N.")
def load(path: Path, device: str) -> None:
    """Reload an artifact and print its quantized tensors."""
    from rich.table import Table

    from .pipeline.run import load as load_model
    from .roles.kernel import QuantLinear

    model = load_model(path, device=device)
    table = Table(title=f"{path}")
    for col in ("tensor", "shape", "format", "kernel", "bytes"):
        table.add_column(col)
    total = 0
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            qw = mod.qweight
            total += qw.nbytes()
            table.add_row(name, f"{qw.shape[0]}x{qw.shape[1]}", qw.format.spec, mod.kernel.name, f"{qw.nbytes():,}")
    console = _console()
    console.print(table)
    console.print(f"reloaded {sum(isinstance(m, QuantLinear) for m in model.modules())} quantized linears, "
                  f"{total:,} bytes")


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--tensors", "show_tensors", is_flag=True, help="Also list every tensor.")
def inspect(path: Path, show_tensors: bool) -> None:
    """Describe an artifact: metadata, tensor types, bits per weight by tensor kind."""
    from rich.markup import escape
    from rich.table import Table

    if not path.exists():
        raise UsageError(f"{path} does not exist")
    pm = get_plugin_manager()
    owners = [e.component for e in pm.registry("exporter").entries.values() if e.component.claims(path)]
    if not owners:
        raise UsageError(f"no installed exporter recognises {path}; `qf plugins` lists what is installed")
    report = owners[0].inspect(path)
    console = _console()
    for title, rows in (("summary", report.get("summary", {})), ("metadata", report.get("metadata", {}))):
        table = Table(title=f"{path.name}: {title}")
        table.add_column("key")
        table.add_column("value", overflow="fold")
        for k, v in rows.items():
            table.add_row(escape(str(k)), escape(_fmt(v)))
        console.print(table)
    table = Table(title="tensors by kind")
    for col in ("kind", "tensors", "weights", "bytes", "bits/weight", "types"):
        table.add_column(col, justify="left" if col in ("kind", "types") else "right")
    for kind, k in report.get("kinds", {}).items():
        table.add_row(kind, _fmt(k["tensors"]), _fmt(k["weights"]), _fmt(k["bytes"]), f"{k['bpw']:.3f}",
                      ", ".join(f"{t} x{n}" for t, n in k["types"].items()))
    console.print(table)
    for warning in report.get("warnings", []):
        console.print(f"[bold yellow]warning:[/] {escape(warning)}")
    if show_tensors:
        table = Table(title="tensors")
        for col in ("name", "type", "shape", "bytes"):
            table.add_column(col)
        for row in report.get("tensors", []):
            table.add_row(*(escape(str(c)) for c in row))
        console.print(table)


@cli.command()
@click.option("--model", default=None, help="Model folder or hub id (default: the embedded pycode-7m).")
@click.option("--quantizer", "-q", "quantizers", multiple=True, help="Quantizer (repeatable; default: rtn).")
@click.option("--format", "-f", "formats", multiple=True,
              help="Format (repeatable); every quantizer runs with every format.")
@click.option("--recipe", "recipes", multiple=True, type=click.Path(path_type=Path),
              help="TOML recipe (repeatable): one more variant each, named after the file.")
@click.option("--evaluator", "evaluators", multiple=True, metavar="NAME[:KEY=VALUE,...]",
              help="Evaluator (repeatable; default: kl and size). size is always added.")
@click.option("--evaluator-opt", multiple=True, metavar="[NAME.]KEY=VALUE", help="Evaluator option (repeatable).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("qf-compare"), show_default=True,
              help="Folder for compare.md, compare.json, compare.png (and artifacts).")
@click.option("--artifacts", is_flag=True, help="Also export every variant with the qf exporter and report "
              "the artifact's figures.")
@click.option("--device", default="cpu", help="cpu, cuda or cuda:N.")
@click.option("--calibrator-opt", multiple=True, metavar="KEY=VALUE", help="Calibrator option for every variant.")
@click.option("--no-cache", is_flag=True, help="Do not read or write the original model's cached results.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def compare(model: str | None, quantizers: tuple[str, ...], formats: tuple[str, ...], recipes: tuple[Path, ...],
            evaluators: tuple[str, ...], evaluator_opt: tuple[str, ...], out: Path, artifacts: bool, device: str,
            calibrator_opt: tuple[str, ...], no_cache: bool, no_progress: bool) -> None:
    """Run several recipes on one model; write a table and a quality-vs-size plot."""
    from .evaluation.compare import compare as run_compare
    from .evaluation.compare import variants_from
    from .progress import Progress

    variants = variants_from(quantizers, formats, recipes)
    specs = _evaluator_specs(evaluators, evaluator_opt, [("kl", {}), ("size", {})])
    extra: dict[str, Any] = {}
    cal = parse_key_values(calibrator_opt, flag="--calibrator-opt")
    if cal:
        extra["calibrator_options"] = cal
    plain = not no_progress and not sys.stderr.isatty()  # a log file or a pipe: a plain line per variant
    t0 = time.perf_counter()
    with Progress(enabled=not no_progress and sys.stderr.isatty(), total=len(variants), label="comparing",
                  unit="variants") as bar:
        def on_variant(i: int, n: int, label: str) -> None:
            if i:
                bar.advance()
            bar.describe(label)
            if plain:
                click.echo(f"[{i + 1}/{n}] {label} ({time.perf_counter() - t0:.0f} s so far)", err=True)

        result = run_compare(model, variants, evaluators=specs, out=out, device=device, artifacts=artifacts,
                             cache=not no_cache, on_variant=on_variant, **extra)
        bar.advance()
    console = _console()
    console.print(result.table.read_text(), markup=False, highlight=False)
    if result.plot is None:
        from .evaluation.compare import PLOT_EXTRA

        console.print(f"wrote {result.table}, {result.data}; no plot: {PLOT_EXTRA}", markup=False)
    else:
        console.print(f"wrote {result.table}, {result.plot}, {result.data}")


@cli.command()
@click.option("--model", default=None, help="Model folder or hub id whose tokenizer (and chat template) is used "
              "(default: the embedded pycode-7m).")
@click.option("--calibrator", default=None, help="Calibration source (default: text).")
@click.option("--calibrator-opt", multiple=True, metavar="KEY=VALUE", help="Calibrator option (repeatable).")
@click.option("--recipe", type=click.Path(path_type=Path), default=None,
              help="TOML recipe: its model and [calibrator] table; flags override it.")
@click.option("--show", type=int, default=1, show_default=True, help="Samples to print as the model reads them.")
@click.option("--max-chars", type=int, default=2000, show_default=True, help="Characters shown per sample.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON (no samples).")
@click.option("--trust-remote-code", is_flag=True, default=False, help="Allow the model's own Python code.")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit).")
def calib(model: str | None, calibrator: str | None, calibrator_opt: tuple[str, ...], recipe: Path | None,
          show: int, max_chars: int, as_json: bool, trust_remote_code: bool, revision: str | None) -> None:
    """Preview the calibration a run would use: counts, lengths, hashes and the first samples."""
    import json

    from .pipeline.preview import preview_calibration

    args: dict[str, Any] = {}
    if recipe is not None:
        from .recipe import load_recipe

        args = load_recipe(recipe)
    options = {**args.get("calibrator_options", {}), **parse_key_values(calibrator_opt, flag="--calibrator-opt")}
    p = preview_calibration(model or args.get("model"), calibrator or args.get("calibrator"), options,
                            trust_remote_code=trust_remote_code, revision=revision)
    if as_json:
        click.echo(json.dumps(p.to_json(), indent=2, default=str))
        return
    c = p.calibration
    d = c.describe()
    info = c.info
    click.echo(f"calibrator: {p.calibrator} ({p.plugin}), tokenizer of {p.model}")
    click.echo(f"source: {c.source}")
    packing = {True: "packed windows", False: "one document per sequence"}.get(info.get("packing"), "")
    click.echo(f"samples: {d['samples']:,}  tokens: {d['tokens']:,}  length min/mean/max: {d['min_length']:,} / "
               f"{d['mean_length']:,} / {d['max_length']:,}" + (f"  ({packing})" if packing else ""))
    click.echo(f"sha256 of the source: {c.sha256 or '-'}\nsha256 of the token ids: {d['ids_sha256']}")
    for part in info.get("parts", []):
        click.echo(f"  part {part['name']} (weight {part['weight']:g}): {part['samples']:,} samples, "
                   f"{part['tokens']:,} tokens ({100 * part['token_share']:.1f}% of the tokens) from {part['source']}")
    hist = p.histogram()
    top = max(n for _, _, n in hist)
    click.echo("lengths (tokens):")
    for lo, hi, n in hist:
        label = f"{lo}" if lo == hi else f"{lo}-{hi}"
        click.echo(f"  {label:>11}  {'#' * max(1 if n else 0, round(40 * n / top)):<40}  {n:,}")
    for w in info.get("warnings", []):
        click.echo(f"warning: {w}")
    lengths = c.sample_lengths().tolist()
    for i in range(min(show, c.n_samples)):
        text = p.sample_text(i)
        more = f"\n… ({len(text) - max_chars:,} more characters)" if len(text) > max_chars else ""
        click.echo(f"\n--- sample {i + 1} of {c.n_samples} ({lengths[i]:,} tokens) ---\n{text[:max_chars]}{more}")


@cli.command(name="plan")
@click.option("--model", required=True, help="Model folder, a bare config.json, or a hub id (only its config is read).")
@click.option("--context", type=int, default=4096, show_default=True, help="Tokens per sequence the KV cache holds.")
@click.option("--batch", type=int, default=1, show_default=True, help="Sequences served at once.")
@click.option("--gpu", "gpus", multiple=True, metavar="NAME|SIZE",
              help="GPU to fit (repeatable): H100, RTX4090, L40S, A100, ... or a size such as 24GB "
                   "(default: RTX4090, L40S, H100).")
@click.option("--kv-cache", "kv", default="fp16", show_default=True,
              type=click.Choice(["fp16", "bf16", "fp8", "int8", "q8_0", "q4_0"]), help="KV-cache element type.")
@click.option("--format", "formats", multiple=True, metavar="SPEC|PRESET",
              help="Format or exporter preset to size (repeatable; default: bf16, fp8, int8, int4-g128, nf4 and "
                   "llama.cpp's Q8_0 ... Q2_K).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option("--trust-remote-code", is_flag=True, help="Allow the model's own config code.")
@click.option("--revision", default=None, help="Hub revision of the config.")
def plan_(model: str, context: int, batch: int, gpus: tuple[str, ...], kv: str, formats: tuple[str, ...],
          as_json: bool, trust_remote_code: bool, revision: str | None) -> None:
    """How much GPU memory serving a model takes per format (weights, KV cache, activations,
    runtime), from its config alone, and which formats fit which GPU."""
    from rich.table import Table

    from .deploy.vram import GiB, advice, plan_memory

    p = plan_memory(model, context=context, batch=batch, kv=kv, formats=formats or None, gpus=gpus or None,
                    trust_remote_code=trust_remote_code, revision=revision)
    if as_json:
        click.echo(json.dumps(p.to_json(), indent=1))
        return
    s, console = p.shape, _console()
    line = f"{s.name}: {s.parameters / 1e9:.2f}B parameters in memory"
    if s.experts:
        line += (f" ({s.experts} experts, {s.experts_per_token} per token: {s.active_parameters / 1e9:.2f}B active "
                 "per token — that is compute, not memory: every expert stays resident)")
    console.print(line, highlight=False)
    console.print(f"KV cache: {s.kv_bytes_per_token(kv, context) / 1024:.1f} KiB per token ({kv})", highlight=False)
    table = Table(title=f"memory at {context:,} tokens x {batch} sequence(s), GiB")
    for col in ("format", "bpw", "weights", "KV cache", "activations", "runtime", "total",
                *(f"{name} ({b / GiB:.0f} GiB)" for name, b in p.gpus)):
        table.add_column(col, justify="left" if col == "format" else "right")
    for r in p.rows:
        fits = []
        for _name, b in p.gpus:
            n = p.gpus_needed(r, b)
            fits.append("fits" if n == 1 else f"{n} GPUs" if n else "no")
        table.add_row(r.label, f"{8 * r.weights / s.parameters:.2f}", f"{r.weights / GiB:.2f}", f"{r.kv_cache / GiB:.2f}",
                      f"{r.activations / GiB:.2f}", f"{r.runtime / GiB:.2f}", f"{r.total / GiB:.2f}", *fits)
    console.print(table)
    for a in p.assumptions():
        console.print(f"  assumed: {a}", highlight=False)
    if p.skipped:
        console.print(f"  not sized (no plugin offers them): {', '.join(p.skipped)}", highlight=False)
    console.print(f"  advice: {advice(s)}", highlight=False)


@cli.command()
@click.option("--base", required=True, type=click.Path(path_type=Path),
              help="The fp16/bf16 model folder the adapter was trained on.")
@click.option("--adapter", required=True, type=click.Path(path_type=Path), help="A PEFT LoRA adapter folder.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for the merged checkpoint.")
@click.option("--dtype", default=None, type=click.Choice(["float16", "bfloat16", "float32"]),
              help="Dtype of the merged weights (default: the base's).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
@click.option("--trust-remote-code", is_flag=True, help="Allow the model's own code.")
def merge(base: Path, adapter: Path, out: Path, dtype: str | None, overwrite: bool, trust_remote_code: bool) -> None:
    """Merge a LoRA adapter into its float base: the one checkpoint to quantize from (refuses a
    quantized base and a base that already has an adapter merged into it)."""
    from .deploy.merge import MARKER
    from .deploy.merge import merge as merge_adapter

    marker = merge_adapter(base, adapter, out, dtype=dtype, overwrite=overwrite, trust_remote_code=trust_remote_code)
    _console().print(f"merged {adapter} (rank {marker['rank']}) into {base}: {out} ({marker['dtype']}); "
                     f"{MARKER} records both hashes. Quantize it: qf run --model {out}", highlight=False)


@cli.command("new-plugin")
@click.argument("name")
@click.option("--role", required=True, type=click.Choice(["quantizer", "format", "exporter", "evaluator", "calibrator", "kernel"]),
              help="What the plugin registers.")
@click.option("--dir", "parent", type=click.Path(path_type=Path), default=Path("."), show_default=True,
              help="Folder to create the package in.")
def new_plugin(name: str, role: str, parent: Path) -> None:
    """Write an installable plugin package (a working component, its entry point, passing tests)."""
    from .scaffold import scaffold

    folder = scaffold(name, role, parent)
    article = "an" if role[0] in "aeiou" else "a"
    click.echo(f"wrote {folder}: {article} {role} {name.removeprefix('qf-')!r}; next:\n"
               f"  pip install -e \"{folder}[testing]\" && python -m pytest {folder}")


def main() -> None:
    """Console entry point of ``qf`` (a Ctrl-C while plugins and torch load is one line too)."""
    signal.signal(signal.SIGINT, _on_ctrl_c)
    mmap_large_allocations()  # freed tensors go back to the system (see quantfoundry.memory)
    try:
        cli()
    except KeyboardInterrupt:
        click.echo(f"Error: {INTERRUPTED}", err=True)
        sys.exit(130)
    except Exception:
        if not _CTRL_C:
            raise
        click.echo(f"Error: {INTERRUPTED}", err=True)  # an import broken off by the Ctrl-C
        sys.exit(130)

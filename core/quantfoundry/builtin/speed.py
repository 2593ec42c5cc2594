"""Built-in evaluator ``speed``: prefill and decode tokens/s and peak memory, on the run's device.

Measured on the quantized model (with the kernel the run chose) and on the original, one
after the other in the same process, so the two columns are a side-by-side comparison.

* ``prefill_tok_s``: a batch-1 forward over ``prompt_tokens`` tokens (no cache), median of
  ``repeats`` timed runs after ``warmup`` untimed ones;
* ``decode_tok_s``: ``new_tokens`` greedy steps with the KV cache after that prefill,
  tokens per second of the steps alone (median of ``repeats``). How the steps run is the
  ``decode`` option (``quantfoundry.evaluation.decode``): on CUDA by default a static KV cache
  and the step captured in a CUDA graph (``graph``), so batch-1 decode measures the kernels and
  not Python's launch overhead; on CPU transformers' dynamic cache (``eager``). ``decode_mode``
  says what ran (a kernel that cannot be captured falls back to ``static``, with the reason);
* ``decode_tok_s@bN``: with ``batch_sizes`` (``"1,4,16,64"``), the same for ``N`` sequences
  decoded together (tokens of all sequences per second): where a kernel's batch range shows;
* ``kernels``: the kernels the quantized linears ran on (a linear whose calls went to two
  kernels by token count shows both);
* ``weights_mib``: the bytes of the model's parameters and buffers;
* ``peak_mib``: ``weights_mib`` plus the largest memory growth during the timed runs
  (CUDA: ``torch.cuda.max_memory_allocated``; CPU on Linux: the process's peak RSS, reset
  through ``/proc/self/clear_refs``; absent where neither is available).

Timings on a busy machine are noisy; compare the ratio of the two columns, not absolutes.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UsageError
from ..evaluation.decode import DECODE_MODES, resolve_mode, time_decode
from ..hookspecs import hookimpl
from ..options import Options
from ..roles.evaluator import EvalTarget, Evaluator, Metric

_MIB = 1 << 20


@dataclass(frozen=True, kw_only=True)
class SpeedOptions(Options):
    prompt_tokens: int = field(default=256, metadata={"help": "prompt length for the prefill timing"})
    new_tokens: int = field(default=32, metadata={"help": "greedy decode steps timed after the prefill"})
    repeats: int = field(default=3, metadata={"help": "timed repetitions (the median is reported)"})
    warmup: int = field(default=1, metadata={"help": "untimed repetitions first"})
    seed: int = field(default=0, metadata={"help": "seed of the random prompt"})
    batch_sizes: str = field(default="1", metadata={
        "help": "comma-separated numbers of sequences decoded together (decode_tok_s@bN for each N > 1)"})
    decode: str = field(default="auto", metadata={
        "help": "how decode steps run: graph (static KV cache + CUDA graph; CUDA only), static (static "
                "KV cache, eager), eager (dynamic cache), auto (graph on CUDA, eager on CPU)"})

    def __post_init__(self) -> None:
        try:
            sizes = [int(b) for b in self.batch_sizes.split(",")]
        except ValueError:
            raise ValueError(f"batch_sizes must be comma-separated integers, got {self.batch_sizes!r}") from None
        if not sizes or min(sizes) < 1:
            raise ValueError(f"batch_sizes must be positive, got {self.batch_sizes!r}")
        for name in ("prompt_tokens", "new_tokens", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, got {self.decode!r}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_kib(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class _PeakMemory:
    """Largest memory growth (bytes) while active: CUDA allocator or Linux peak RSS."""

    def __init__(self, device: torch.device):
        self.device = device
        self.growth: int | None = None

    def __enter__(self) -> _PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            from ..memory import trim_memory

            trim_memory()  # hand freed heap back first, so growth is new memory, not reuse
            try:
                Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
                self._base = _rss_kib("VmRSS")
            except OSError:
                self._base = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.growth = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._base is not None:
            peak = _rss_kib("VmHWM")
            self.growth = None if peak is None else max(0, peak - self._base) * 1024


@torch.no_grad()
def _time_prefill(model: torch.nn.Module, prompt: torch.Tensor, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    model(input_ids=prompt, use_cache=True)
    _sync(device)
    return time.perf_counter() - t0


class SpeedEvaluator(Evaluator):
    name = "speed"
    description = "prefill and decode tokens/s and peak memory on the run's device (quantized vs original)"
    Options = SpeedOptions
    cache_original = False  # timings belong to this run, side by side
    on_artifact = False  # the artifact runs the same kernel; its timing adds nothing
    higher_is_better = {"prefill_tok_s": True, "decode_tok_s": True, "weights_mib": False, "peak_mib": False}

    options: SpeedOptions

    def check_device(self, device: torch.device) -> str | None:
        if resolve_mode(self.options.decode, device) == "graph" and device.type != "cuda":
            return f"decode=graph needs a CUDA device (the run is on {device}); use decode=static or decode=eager"
        return None

    def evaluate(self, target: EvalTarget) -> dict[str, Metric]:
        o = self.options
        model = target.model
        if model is None:
            raise UsageError(f"speed needs a torch model; the {target.label} is served by "
                             f"{target.engine.name if target.engine else 'an engine'}: time it with that engine's tools")
        vocab = int(model.get_output_embeddings().weight.shape[0]) if model.get_output_embeddings() is not None \
            else int(target.source.config.get_text_config().vocab_size)
        gen = torch.Generator().manual_seed(o.seed)
        sizes = sorted({int(b) for b in o.batch_sizes.split(",")} | {1})
        prompts = {b: torch.randint(0, vocab, (b, o.prompt_tokens), generator=gen).to(target.device) for b in sizes}
        prompt = prompts[1]
        weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())
                      if t.device.type != "meta")
        mode = resolve_mode(o.decode, target.device)
        for _ in range(o.warmup):
            _time_prefill(model, prompt, target.device)
        with _PeakMemory(target.device) as peak:
            prefill = [_time_prefill(model, prompt, target.device) for _ in range(o.repeats)]
            dec = time_decode(model, prompt, o.new_tokens, mode=mode, repeats=o.repeats, warmup=o.warmup)
        out: dict[str, Metric] = {
            "prefill_tok_s": o.prompt_tokens / statistics.median(prefill),
            "decode_tok_s": dec.tokens_per_s,
            "decode_mode": dec.mode,
            "weights_mib": weights / _MIB,
            "device": str(target.device),
        }
        if peak.growth is not None:
            out["peak_mib"] = (weights + peak.growth) / _MIB
        for b in sizes[1:]:
            out[f"decode_tok_s@b{b}"] = time_decode(model, prompts[b], o.new_tokens, mode=mode, repeats=o.repeats,
                                                    warmup=max(1, o.warmup)).tokens_per_s
        from ..roles.kernel import QuantLinear

        used = sorted({name for m in model.modules() if isinstance(m, QuantLinear) for name in m.kernels_used})
        if used:
            out["kernels"] = ", ".join(used)
        return out


@hookimpl
def qf_register_evaluators(register):
    register(SpeedEvaluator)

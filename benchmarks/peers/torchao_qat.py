"""Peer QAT runner: torchao's fake quantization (``QATConfig``), trained with our distillation loop.

What it measures
----------------
Quantization-aware training of a Hugging Face causal LM with torchao 0.18.0's weight-only fake
quantization of the decoder-block linears, and the weights it produces. The training loop is a
copy of ``quantfoundry.toolkit.distill`` (not imported: peer runners never import quantfoundry),
so torchao's fake quantizers are compared with ours on the same trajectory: same loss, same
sequence order, same optimiser and schedule, same held-out selection and best-state rule.
``seconds_train`` is the wall time of the step loop (``time.perf_counter``), which includes the
held-out measurements made inside it (every ``--eval-every`` steps and after the last step;
``seconds_held_out`` is their share); the measurement before training, loading, preparing and the
export are not timed. Run it in the peer's own virtualenv (``setup_torchao.sh``:
``/work/venvs/torchao``, torch 2.13.0 CPU, torchao 0.18.0).

How
---
* The model is loaded in float32 and deep-copied as the frozen reference *before* torchao's
  prepare (prepare re-uses the same ``nn.Parameter`` objects). Both stay in eval mode.
* Fake quantization (``quantize_`` with a ``filter_fn`` on the module name): every ``nn.Linear``
  under ``model.layers.`` -- not ``lm_head``, not the embeddings; weights only, no activations:
    - ``--mapping sym``: ``QATConfig(IntxWeightOnlyConfig(weight_dtype=torch.intB,
      granularity=PerGroup(g)), step="prepare")``. torchao recomputes every group's scale from the
      current weights in each forward: ``s = max|w| / ((qmax - qmin) / 2)`` (``= max|w| / (2^(B-1)
      - 1/2)``), ``q = clamp(round(w / s), -2^(B-1), 2^(B-1) - 1)``, ``w_q = q s`` (the largest
      positive weight lands on ``+2^(B-1)`` and is clipped).
    - ``--mapping sym --range-learning``: the same grid spelled out as ``IntxFakeQuantizeConfig(
      torch.intB, g, is_symmetric=True, is_dynamic=False, range_learning=True,
      zero_point_precision=torch.float32)``; ``initialize_fake_quantizers`` (one forward on the
      first training sequence) sets each group's scale from min/max once and makes it an
      ``nn.Parameter``, trained with the weights (plain gradients, no LSQ scaling; its own AdamW
      group with peak learning rate ``--scale-lr``, default ``--lr``; weight decay applies to it too).
    - ``--mapping asym``: ``IntxFakeQuantizeConfig(torch.uintB, g, is_symmetric=False,
      zero_point_precision=torch.float32, zero_point_domain=ZeroPointDomain.FLOAT)``: min/max per
      group, ``s = (max - min) / (2^B - 1)``, ``w_q = min + q s`` with ``q`` in ``[0, 2^B - 1]``
      (torchao keeps the offset as ``zp = min + s 2^(B-1)``). The default asymmetric config
      (``zero_point_domain=INT``, int32 zero points) is silently wrong in torchao <= 0.18: the
      tinygemm-style float zero point is truncated to an integer (about 0), so the grid clips.
      ``--range-learning`` with ``asym`` is refused: ``initialize_fake_quantizers`` rounds the
      float zero point to an integer too (0 here), for either zero-point domain.
* Trainable: each fake-quantized linear's weight (and its quantizer's scale with
  ``--range-learning``); everything else ``requires_grad_(False)``, biases included (as in
  quantfoundry's ``qat``).
* Loop (as ``distill``): the last ``max(1, round(n * held_out))`` sequences are held out (none when
  ``held_out`` is 0 or ``n < 2``); micro-batch ``m`` of step ``s`` takes training sequences
  ``_order(n_train, (s * accumulate + m) * batch + j, seed)``, ``j < batch`` (a seeded permutation
  per epoch); loss = mean over tokens of ``KL(p_reference || p_model)`` (float32 log-softmax), divided
  by ``accumulate``, backward per micro-batch (``use_cache=False``); AdamW; ``LambdaLR`` with a linear warm-up then a
  cosine decay to 0; the held-out loss (batch-wise, weighted by sequence count) is measured before
  training, every ``eval_every`` steps and at the end, and the parameters are restored to the best
  measured state (the untouched start included).

Output
------
``--out FILE.safetensors``: for every fake-quantized linear, ``m.weight_fake_quantizer(m.weight)``
(under ``no_grad``, after the best state is restored) as float32 under ``"<module>.weight"`` (e.g.
``model.layers.0.self_attn.q_proj.weight``): the weights the trained fake-quantized model computes
with. For ``sym`` the script then runs torchao's real convert, ``QATConfig(IntxWeightOnlyConfig(...),
step="convert")``, and requires every ``weight.dequantize()`` to equal the written tensor bit for bit
(torchao has no CPU convert for this asymmetric grid). It also checks that ``F.linear`` with the
written weight reproduces each fake-quantized module's forward, and that the restored state's
held-out loss equals the best one measured. ``--self-check`` adds a float64 NumPy
reimplementation of torchao's grid (from the trained master weights, or the learned scales) and
checks that the written weights are on it (``self_check`` in the JSON). A sibling ``FILE.json``
records the settings, versions, per-step training losses, held-out losses, best step, times,
tokens trained and the checks.

Example::

    P=/work/venvs/torchao/bin/python
    $P benchmarks/peers/torchao_qat.py --model core/quantfoundry/data/pycode-7m --train-ids ids.pt \\
        --bits 3 --group-size 128 --mapping sym --steps 20 --lr 1e-3 --warmup 2 --batch 2 \\
        --out /tmp/tq/sym.safetensors --self-check
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

PROG = "torchao_qat.py"
DECODER_PREFIX = "model.layers."


def fail(message: str) -> None:
    """Exit with status 2 and a one-line error."""
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(prog=PROG, description="torchao QAT (fake quantization) trained with "
                                "quantfoundry's distillation loop; dequantized weights out.",
                                epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="Hugging Face model folder")
    p.add_argument("--train-ids", required=True, type=Path,
                   help="torch.save'd int64 tensor [n, seq_len] of token ids (make_calib_ids.py)")
    p.add_argument("--bits", type=int, choices=(2, 3, 4), required=True)
    p.add_argument("--group-size", type=int, default=128, help="columns per group; 0 = per output channel")
    p.add_argument("--mapping", choices=("sym", "asym"), default="sym")
    p.add_argument("--range-learning", action="store_true",
                   help="learn each group's scale (torchao prototype; sym only)")
    p.add_argument("--steps", type=int, required=True, help="optimiser steps")
    p.add_argument("--lr", type=float, required=True, help="peak learning rate (AdamW)")
    p.add_argument("--warmup", type=int, default=0, help="steps of linear warm-up, then a cosine decay to 0")
    p.add_argument("--batch", type=int, default=1, help="sequences per micro-batch")
    p.add_argument("--accumulate", type=int, default=1, help="micro-batches per step")
    p.add_argument("--held-out", type=float, default=0.1, help="share of the sequences held out (last ones)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--scale-lr", type=float, default=0.0,
                   help="peak learning rate of the learned scales with --range-learning (0: --lr)")
    p.add_argument("--eval-every", type=int, default=0, help="steps between held-out measurements (0: start, end)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sequence order")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--device", default="cpu", help="where to train (cpu, cuda); export and checks run on the CPU")
    p.add_argument("--self-check", action="store_true",
                   help="also check the written weights against a float64 reimplementation of torchao's grid")
    p.add_argument("--out", required=True, type=Path, help="output .safetensors (the JSON goes next to it)")
    a = p.parse_args(argv)
    if not (a.model / "config.json").is_file():
        fail(f"--model {a.model}: not a Hugging Face model folder (no config.json)")
    if a.out.suffix != ".safetensors":
        fail(f"--out must end in .safetensors, got {a.out}")
    if a.group_size < 0 or a.group_size == 1:
        fail(f"--group-size must be 0 (per channel) or >= 2, got {a.group_size}")
    if a.steps < 1 or a.batch < 1 or a.accumulate < 1:
        fail("--steps, --batch and --accumulate must be at least 1")
    if not (a.lr > 0 and math.isfinite(a.lr)):
        fail(f"--lr must be positive, got {a.lr}")
    if not 0 <= a.held_out < 1:
        fail(f"--held-out is a share of the sequences in [0, 1), got {a.held_out}")
    if a.warmup < 0 or a.eval_every < 0 or a.weight_decay < 0 or a.scale_lr < 0 or a.threads < 1:
        fail("--warmup, --eval-every, --weight-decay and --scale-lr must be >= 0, --threads >= 1")
    if a.scale_lr and not a.range_learning:
        fail("--scale-lr needs --range-learning (only then are there scales to train)")
    if a.range_learning and a.mapping == "asym":
        fail("--range-learning is sym only: torchao's initialize_fake_quantizers rounds the asymmetric "
             "(float) zero point to an integer, which puts it at about 0")
    return a


# ----------------------------------------------------------------------------------------------
# The loop of quantfoundry.toolkit.distill, copied (peer runners do not import quantfoundry).


def kl_to_reference(model: nn.Module, reference: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ``KL(p_reference || p_model)`` for the sequences ``ids`` ``[b, t]``."""
    with torch.no_grad():
        target = torch.log_softmax(reference(ids, use_cache=False).logits.float(), -1)
    logp = torch.log_softmax(model(ids, use_cache=False).logits.float(), -1)
    return (target.exp() * (target - logp)).sum(-1).mean()


def lr_factor(step: int, a: argparse.Namespace) -> float:
    """The learning-rate multiplier at ``step`` (0-based): linear warm-up, then cosine to 0."""
    if step < a.warmup:
        return (step + 1) / a.warmup
    span = max(1, a.steps - a.warmup)
    return 0.5 * (1 + math.cos(math.pi * (step - a.warmup) / span))


def _order(n: int, counter: int, seed: int) -> int:
    """The training sequence at position ``counter`` of the stream: epoch ``counter // n`` is a
    permutation drawn from ``seed`` and the epoch."""
    epoch, pos = divmod(counter, n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return int(perm[pos])


def split(n: int, held_out: float) -> tuple[list[int], list[int]]:
    """Training and held-out sequence indices, as ``distill`` picks them."""
    n_held = max(1, round(n * held_out)) if held_out > 0 and n >= 2 else 0
    train_idx = list(range(n - n_held)) or list(range(n))
    held_idx = list(range(n - n_held, n)) or train_idx
    return train_idx, held_idx


def train(model: nn.Module, reference: nn.Module, ids: torch.Tensor, params: list[nn.Parameter],
          a: argparse.Namespace, param_groups: list[dict] | None = None) -> dict[str, Any]:
    """``distill`` without checkpoints, autocast or activation checkpointing: train ``params``
    (AdamW over ``param_groups`` when given: groups over the same parameters with their own
    ``lr``), leave them at the best held-out state."""
    train_idx, held_idx = split(ids.shape[0], a.held_out)
    held_seconds = [0.0]

    def measure() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            total = 0.0
            for i in range(0, len(held_idx), a.batch):
                part = held_idx[i:i + a.batch]
                total += float(kl_to_reference(model, reference, ids[part])) * len(part)
        held_seconds[0] += time.perf_counter() - t0
        return total / len(held_idx)

    groups = [g for g in param_groups if g["params"]] if param_groups is not None else [{"params": params}]
    if {id(p) for g in groups for p in g["params"]} != {id(p) for p in params}:
        raise ValueError("param_groups must hold exactly the trained params")
    opt = torch.optim.AdamW(groups, lr=a.lr, weight_decay=a.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, a))
    losses: list[float] = []
    held: list[tuple[int, float]] = [(0, measure())]
    print(f"held-out KL before training: {held[0][1]:.6g}", flush=True)
    held_seconds[0] = 0.0  # only the measurements inside the timed loop count below
    best, best_step = [p.detach().clone() for p in params], 0
    every = max(1, a.steps // 20)
    t0 = time.perf_counter()
    with torch.enable_grad():
        for step in range(a.steps):
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for micro in range(a.accumulate):
                counter = (step * a.accumulate + micro) * a.batch
                part = [train_idx[_order(len(train_idx), counter + j, a.seed)] for j in range(a.batch)]
                value = kl_to_reference(model, reference, ids[part]) / a.accumulate
                value.backward()
                total += float(value.detach())
            opt.step()
            sched.step()
            losses.append(total)
            done = step + 1
            if (a.eval_every and done % a.eval_every == 0) or done == a.steps:
                now = measure()
                held.append((done, now))
                if now < min(v for _, v in held[:-1]):
                    best, best_step = [p.detach().clone() for p in params], done
                print(f"step {done}/{a.steps}: train {total:.6g}, held-out {now:.6g}", flush=True)
            elif done % every == 0:
                print(f"step {done}/{a.steps}: train {total:.6g}", flush=True)
    seconds, seconds_held = time.perf_counter() - t0, held_seconds[0]
    with torch.no_grad():
        for p, v in zip(params, best, strict=True):
            p.copy_(v)
    after = measure()
    return {"train_losses": losses, "held": [list(h) for h in held], "best_step": best_step,
            "seconds_train": seconds, "seconds_held_out": seconds_held,
            "held_after_restore": after, "n_train": len(train_idx), "n_held": len(held_idx),
            "held_is_train": held_idx is train_idx}


# ----------------------------------------------------------------------------------------------
# torchao


def int_dtype(bits: int, signed: bool) -> torch.dtype:
    return getattr(torch, f"{'int' if signed else 'uint'}{bits}")


def granularity(a: argparse.Namespace):  # noqa: ANN201  (torchao loads lazily)
    from torchao.quantization import PerAxis, PerGroup
    return PerAxis(0) if a.group_size == 0 else PerGroup(a.group_size)


def base_config(a: argparse.Namespace):  # noqa: ANN201
    """The PTQ config whose grid the symmetric runs train on (and convert with)."""
    from torchao.quantization import IntxWeightOnlyConfig
    return IntxWeightOnlyConfig(weight_dtype=int_dtype(a.bits, True), granularity=granularity(a))


def prepare_config(a: argparse.Namespace):  # noqa: ANN201
    """The ``QATConfig(step="prepare")`` for the requested grid (see the module docstring)."""
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig
    from torchao.quantization.quant_primitives import ZeroPointDomain
    if a.mapping == "asym":
        wc = IntxFakeQuantizeConfig(int_dtype(a.bits, False), granularity(a), is_symmetric=False,
                                    zero_point_precision=torch.float32, zero_point_domain=ZeroPointDomain.FLOAT)
    elif a.range_learning:
        wc = IntxFakeQuantizeConfig(int_dtype(a.bits, True), granularity(a), is_symmetric=True, is_dynamic=False,
                                    range_learning=True, zero_point_precision=torch.float32)
    else:
        return QATConfig(base_config(a), step="prepare")
    return QATConfig(weight_config=wc, step="prepare")


def is_target(module: nn.Module, fqn: str) -> bool:
    """The linears torchao fake-quantizes: those of the decoder blocks."""
    return isinstance(module, nn.Linear) and fqn.startswith(DECODER_PREFIX)


def load_ids(path: Path, vocab_size: int) -> torch.Tensor:
    """The training ids: a 2-D integer tensor inside the vocabulary, as int64."""
    try:
        ids = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (missing file, not a torch.save file, unpickling refused...)
        fail(f"--train-ids {path}: cannot load it as a tensor ({type(e).__name__}: {e})".splitlines()[0])
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.dtype.is_floating_point or ids.numel() == 0:
        fail(f"--train-ids {path}: expected a non-empty integer tensor [n, seq_len], got {type(ids).__name__} "
             f"{tuple(getattr(ids, 'shape', ()))} {getattr(ids, 'dtype', '')}")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        fail(f"--train-ids {path}: ids outside [0, {vocab_size})")
    return ids.to(torch.int64).contiguous()


def check_targets(model: nn.Module, a: argparse.Namespace) -> list[str]:
    """The targeted linears' names; a one-line error when there is none or the group size does not fit."""
    names = [n for n, m in model.named_modules() if is_target(m, n)]
    if not names:
        fail(f"{a.model}: no nn.Linear under {DECODER_PREFIX!r}")
    if a.group_size:
        bad = [(n, model.get_submodule(n).in_features) for n in names
               if model.get_submodule(n).in_features % a.group_size]
        if bad:
            widths = sorted({w for _, w in bad})
            fail(f"--group-size {a.group_size} does not divide in_features of {len(bad)} of {len(names)} decoder "
                 f"linears (in_features {widths}, e.g. {bad[0][0]}); use a divisor or 0 (per channel)")
    return names


def export(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """``m.weight_fake_quantizer(m.weight)`` of every fake-quantized linear, float32."""
    from torchao.quantization.qat.linear import FakeQuantizedLinear
    out = {}
    with torch.no_grad():
        for name in names:
            m = model.get_submodule(name)
            if not isinstance(m, FakeQuantizedLinear):
                raise RuntimeError(f"{name} is {type(m).__name__}, not FakeQuantizedLinear, after prepare")
            out[f"{name}.weight"] = m.weight_fake_quantizer(m.weight).detach().to(torch.float32).contiguous()
    return out


def forward_check(model: nn.Module, names: list[str], tensors: dict[str, torch.Tensor]) -> float:
    """Worst ``|F.linear(x, W_written, b) - m(x)|`` over the fake-quantized modules, relative to max(1, |y|)."""
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    with torch.no_grad():
        for name in names:
            m = model.get_submodule(name)
            x = torch.randn(4, m.in_features, generator=gen)
            y = m(x)
            diff = (nn.functional.linear(x, tensors[f"{name}.weight"], m.bias) - y).abs().max().item()
            worst = max(worst, diff / max(1.0, y.abs().max().item()))
    if worst > 1e-6:
        raise RuntimeError(f"F.linear with the written weights differs from the fake-quantized forward by {worst:.3g}")
    return worst


def convert_check(model: nn.Module, names: list[str], tensors: dict[str, torch.Tensor],
                  a: argparse.Namespace) -> dict[str, Any]:
    """torchao's real convert (sym only): every ``weight.dequantize()`` must equal the written tensor."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig
    quantize_(model, QATConfig(base_config(a), step="convert"), filter_fn=is_target)
    kinds = set()
    for name in names:
        w = model.get_submodule(name).weight
        kinds.add(type(w).__name__)
        deq = w.dequantize().to(torch.float32)
        if not torch.equal(deq, tensors[f"{name}.weight"]):
            diff = (deq - tensors[f"{name}.weight"]).abs().max().item()
            raise RuntimeError(f"{name}: torchao's convert dequantizes to other values than the fake quantizer "
                               f"(max abs diff {diff:.3g})")
    return {"convert": "QATConfig(IntxWeightOnlyConfig(...), step='convert')", "weight_types": sorted(kinds),
            "dequantize_equals_written": True, "layers": len(names)}


def versions() -> dict[str, str]:
    from importlib.metadata import version
    return {pkg: version(pkg) for pkg in ("torchao", "torch", "transformers", "safetensors", "numpy")}


def run(a: argparse.Namespace) -> int:
    """Load, prepare, train (timed), export, check, save."""
    from safetensors.torch import save_file
    from torchao.quantization import quantize_
    from torchao.quantization.qat import initialize_fake_quantizers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(a.threads)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    ids = load_ids(a.train_ids, model.config.vocab_size)
    names = check_targets(model, a)
    reference = copy.deepcopy(model)  # before prepare: prepare re-uses the same Parameter objects
    reference.eval().requires_grad_(False)
    model.eval()

    quantize_(model, prepare_config(a), filter_fn=is_target)
    train_idx, _ = split(ids.shape[0], a.held_out)
    if a.range_learning:  # scales from min/max once, as nn.Parameters, before the optimiser exists
        with torch.no_grad():
            initialize_fake_quantizers(model, (ids[train_idx[:1]],))
    model.requires_grad_(False)
    weights = [model.get_submodule(n).weight for n in names]
    scales = [p for n in names for p in model.get_submodule(n).weight_fake_quantizer.parameters()]
    params = weights + scales
    for p in params:
        p.requires_grad_(True)
    groups = [{"params": weights}, {"params": scales, "lr": a.scale_lr or a.lr}] if scales else None

    dev = torch.device(a.device)
    model.to(dev)
    reference.to(dev)
    result = train(model, reference, ids.to(dev), params, a, groups)
    model.to("cpu")
    best = min(v for _, v in result["held"])
    if result["held_after_restore"] != best:
        raise RuntimeError(f"held-out loss after restoring the best state is {result['held_after_restore']!r}, "
                           f"the best measured was {best!r}")

    tensors = export(model, names)
    checks: dict[str, Any] = {"forward_max_rel_diff": forward_check(model, names, tensors),
                              "held_after_restore_equals_best": True}
    if a.self_check:
        checks["self_check"] = self_check(model, names, tensors, a)
    if a.mapping == "sym":
        checks["convert"] = convert_check(model, names, tensors, a)

    n, t = map(int, ids.shape)
    settings = {
        "bits": a.bits, "group_size": a.group_size, "granularity": "per_channel" if a.group_size == 0 else "per_group",
        "mapping": a.mapping, "range_learning": a.range_learning, "steps": a.steps, "lr": a.lr,
        "warmup": a.warmup, "batch": a.batch, "accumulate": a.accumulate, "held_out": a.held_out,
        "weight_decay": a.weight_decay, "scale_lr": (a.scale_lr or a.lr) if a.range_learning else None,
        "eval_every": a.eval_every, "seed": a.seed,
        "fake_quant": describe_config(a), "targets": f"nn.Linear under {DECODER_PREFIX!r}", "activations": None,
        "model_dtype": "float32", "loss": "mean over tokens of KL(p_reference || p_model)",
        "schedule": "linear warm-up, then cosine to 0 (LambdaLR)", "optimizer": "AdamW",
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(a.out), metadata={"producer": PROG, "settings": json.dumps(settings)})
    record = {
        "settings": settings,
        "versions": versions(),
        "train_losses": result["train_losses"],
        "held": result["held"],
        "best_step": result["best_step"],
        "held_before": result["held"][0][1], "held_best": best, "held_end": result["held"][-1][1],
        "seconds_train": round(result["seconds_train"], 4),
        "seconds_held_out": round(result["seconds_held_out"], 4),
        "timed": "the step loop, held-out measurements inside it included (not the one before training)",
        "tokens_trained": a.steps * a.accumulate * a.batch * t,
        "n_sequences": n, "seq_len": t, "n_train": result["n_train"], "n_held": result["n_held"],
        "held_is_train": result["held_is_train"],
        "train_ids": str(a.train_ids.resolve()),
        "train_ids_sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest(),
        "model": str(a.model.resolve()),
        "quantized_layers": len(names),
        "trainable_weights": sum(model.get_submodule(n).in_features * model.get_submodule(n).out_features
                                 for n in names),
        "trainable_scales": sum(p.numel() for p in scales),
        "checks": checks,
        "device": a.device, "cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
        "out": str(a.out.resolve()),
    }
    a.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"held-out KL {record['held_before']:.6g} -> {best:.6g} (best at step {record['best_step']}); "
          f"training {record['seconds_train']:.1f} s; {len(tensors)} layers -> {a.out}", flush=True)
    return 0


def describe_config(a: argparse.Namespace) -> str:
    """The torchao call that prepared the model, as text for the JSON."""
    g = "PerAxis(0)" if a.group_size == 0 else f"PerGroup({a.group_size})"
    if a.mapping == "asym":
        return (f"QATConfig(weight_config=IntxFakeQuantizeConfig(torch.uint{a.bits}, {g}, is_symmetric=False, "
                "zero_point_precision=torch.float32, zero_point_domain=ZeroPointDomain.FLOAT))")
    if a.range_learning:
        return (f"QATConfig(weight_config=IntxFakeQuantizeConfig(torch.int{a.bits}, {g}, is_symmetric=True, "
                "is_dynamic=False, range_learning=True, zero_point_precision=torch.float32)) "
                "+ initialize_fake_quantizers")
    return f"QATConfig(IntxWeightOnlyConfig(weight_dtype=torch.int{a.bits}, granularity={g}), step='prepare')"


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    return run(a)


# ----------------------------------------------------------------------------------------------
# --self-check: torchao's grid reimplemented in float64 NumPy (torchao 0.18.0: qat/fake_quantizer.py
# IntxFakeQuantizer._per_channel_or_group_forward, quantization/utils.py get_group_qparams_symmetric /
# get_groupwise_affine_qparams, quant_primitives.py _choose_qparams_affine /
# _choose_qparams_affine_tinygemm / _quantize_affine_[tinygemm_]no_dtype_cast).


def reference_grid(w, bits: int, mapping: str, group: int, learned_scale=None):  # noqa: ANN001, ANN201
    """float64 ``(w_q, q, scale, offset)`` of torchao's grid for the master weight ``w`` [out, in], by group:
    ``w_q = offset + q * scale``, ``q`` integer (sym: offset 0, q in [-2^(b-1), 2^(b-1)-1]; asym: offset =
    the group's min, q in [0, 2^b - 1])."""
    import numpy as np
    out_f, in_f = w.shape
    g = group or in_f
    x = w.astype(np.float64).reshape(out_f, in_f // g, g)
    if mapping == "sym":
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        if learned_scale is None:
            absmax = np.maximum(-np.minimum(x.min(-1), 0), np.maximum(x.max(-1), 0))
            scale = absmax / ((qmax - qmin) / 2)
            scale = np.maximum(scale, np.finfo(np.float32).tiny)  # eps: float32 smallest normal
        else:
            scale = learned_scale.astype(np.float64).reshape(out_f, in_f // g)
        offset = np.zeros_like(scale)
        q = np.clip(np.rint(x / scale[..., None]), qmin, qmax)
    else:
        qmax = 2 ** bits - 1
        lo, hi = x.min(-1), x.max(-1)
        scale = np.maximum((hi - lo) / qmax, 1e-6)  # eps 1e-6 (get_groupwise_affine_qparams)
        offset = lo
        q = np.clip(np.rint((x - lo[..., None]) / scale[..., None]), 0, qmax)
    wq = offset[..., None] + q * scale[..., None]
    return wq.reshape(out_f, in_f), q.reshape(out_f, in_f), scale, offset


def self_check(model: nn.Module, names: list[str], tensors: dict[str, torch.Tensor],
               a: argparse.Namespace) -> dict[str, Any]:
    """Check every written weight against :func:`reference_grid` of the trained master weight:

    * on the grid: ``(W - offset) / scale`` (float64 scale and offset) is within 1e-3 of an integer
      of the grid's range in every element, and no group uses more than ``2^bits`` distinct values;
    * equal to the float64 projection up to float32 rounding (1e-5 of a step), except where a value
      lies halfway between two levels (within 1e-5 of a step in float64): torchao multiplies by a
      float32 ``1 / scale``, which tips such ties either way (counted; frequent when the master
      weights are still the model's bfloat16 values, i.e. when the untouched start is the best state)."""
    import numpy as np
    levels = 2 ** a.bits
    lo_q, hi_q = (-(levels // 2), levels // 2 - 1) if a.mapping == "sym" else (0, levels - 1)
    worst_int, worst_close, other_level, total, worst_distinct, max_halfway = 0.0, 0.0, 0, 0, 0, 0.0
    for name in names:
        m = model.get_submodule(name)
        w = m.weight.detach().numpy()
        learned = m.weight_fake_quantizer.scale.detach().numpy() if a.range_learning else None
        wq, q, scale, offset = reference_grid(w, a.bits, a.mapping, a.group_size, learned)
        got = tensors[f"{name}.weight"].numpy().astype(np.float64)
        out_f, in_f = w.shape
        g = a.group_size or in_f
        k = (got.reshape(out_f, in_f // g, g) - offset[..., None]) / scale[..., None]
        kr = np.rint(k)
        worst_int = max(worst_int, float(np.abs(k - kr).max()))
        if kr.min() < lo_q or kr.max() > hi_q:
            raise RuntimeError(f"{name}: written levels span [{kr.min()}, {kr.max()}], outside [{lo_q}, {hi_q}]")
        distinct = max(len(np.unique(row)) for row in got.reshape(-1, g))
        worst_distinct = max(worst_distinct, distinct)
        differ = kr.reshape(out_f, in_f) != q
        other_level += int(differ.sum())
        total += q.size
        if differ.any():  # only halfway cases may differ: the float64 position must be ~.5 off a level
            x = w.astype(np.float64).reshape(out_f, in_f // g, g)
            pos = ((x - offset[..., None]) / scale[..., None]).reshape(out_f, in_f)[differ]
            max_halfway = max(max_halfway, float(np.abs(np.abs(pos - np.floor(pos)) - 0.5).max()))
        same = ~differ
        tol = np.repeat(scale, g, axis=-1).reshape(out_f, in_f)
        worst_close = max(worst_close, float((np.abs(got - wq) / tol)[same].max()))
    report = {"grid": f"{a.mapping} {a.bits}-bit, group {a.group_size or 'per channel'}, float64 NumPy",
              "scales": "learned (weight_fake_quantizer.scale)" if a.range_learning else "from the master weights",
              "max_distance_from_integer_level": worst_int, "max_distinct_values_per_group": worst_distinct,
              "elements_on_the_other_level_of_a_tie": other_level, "elements": total,
              "max_halfway_offset_of_those": max_halfway,
              "max_abs_diff_in_scales_elsewhere": worst_close}
    if worst_int > 1e-3 or worst_distinct > levels or max_halfway > 1e-5 or worst_close > 1e-5:
        raise RuntimeError(f"self-check failed: {report}")
    print(f"self-check: on the grid (max distance {worst_int:.2e} of a step), {other_level} of {total} "
          f"elements on a neighbouring level (halfway cases), max |diff| {worst_close:.2e} steps", flush=True)
    return report


if __name__ == "__main__":
    sys.exit(main())

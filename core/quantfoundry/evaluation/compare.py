"""``qf compare``: several recipes on one model → a markdown table and a quality-vs-size plot.

Every variant is quantized in memory (or exported too, with ``artifacts``) and evaluated with
the same evaluators; the original's side is computed once and cached
(:mod:`quantfoundry.evaluation.reference`). Writes ``compare.md``, ``compare.json`` and
``compare.png`` (perplexity and mean KL against bits per weight, the original as a dashed line).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..files import write_json_atomic

Spec = tuple[str, Mapping[str, Any]]


@dataclass
class Variant:
    """One recipe: a label and the keyword arguments of :func:`quantfoundry.run`."""

    label: str
    run_args: dict[str, Any]
    quantizer: str = ""


@dataclass
class CompareResult:
    model: str
    rows: list[dict[str, Any]]  # one per variant, the original first
    table: Path
    plot: Path | None  # None when matplotlib (the ``plot`` extra) is not installed
    data: Path
    notes: list[str] = field(default_factory=list)


#: how to get the plot when matplotlib is missing
PLOT_EXTRA = "pip install 'quantfoundry[plot]' (matplotlib) to draw compare.png"


def can_plot() -> bool:
    """True when matplotlib, the ``plot`` extra, is installed."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def variants_from(quantizers: Sequence[str], formats: Sequence[str], recipes: Sequence[Path]) -> list[Variant]:
    """The product quantizers × formats, then one variant per recipe file."""
    from ..recipe import load_recipe

    out = [Variant(f"{q} {f}", {"quantizer": [(q, {})], "format": f}, quantizer=q)
           for q in (quantizers or (["rtn"] if formats else [])) for f in (formats or [None])]
    for v in out:
        if v.run_args["format"] is None:
            del v.run_args["format"]
            v.label = v.quantizer
    for path in recipes:
        args = load_recipe(path)
        args.pop("evaluators", None)
        args.pop("out", None)
        stages = args.get("quantizer") or [("rtn", {})]
        out.append(Variant(Path(path).stem, args, quantizer="+".join(n for n, _ in stages)))
    if not out:
        raise UsageError("nothing to compare: give --format (with --quantizer) and/or --recipe")
    labels = [v.label for v in out]
    for v in out:
        if labels.count(v.label) > 1:
            raise UsageError(f"two variants are both called {v.label!r}; rename a recipe file")
    return out


def _num(metrics: Mapping[str, Any], ev: str, name: str, column: str) -> float | None:
    value = metrics.get(ev, {}).get(name, {}).get(column)
    return float(value) if isinstance(value, int | float) else None


def _row(label: str, quantizer: str, metrics: Mapping[str, Any], column: str) -> dict[str, Any]:
    row: dict[str, Any] = {"variant": label, "quantizer": quantizer}
    row["bpw"] = _num(metrics, "size", "linear_bpw", column)
    row["model_mib"] = (_num(metrics, "size", "model_bytes", column) or math.nan) / 2**20
    row["perplexity"] = _num(metrics, "perplexity", "perplexity", column)
    if row["perplexity"] is None:  # kl scores the same positions for both models
        if column == "original":
            row["perplexity"] = _num(metrics, "kl", "ppl_original", "quantized")
        else:
            row["perplexity"] = _num(metrics, "kl", "ppl_quantized", column)
    if column != "original":
        for name in ("kl_mean", "kl_p99", "same_top1_pct"):
            row[name] = _num(metrics, "kl", name, column)
    else:
        row.update(kl_mean=0.0 if "kl" in metrics else None, kl_p99=0.0 if "kl" in metrics else None,
                   same_top1_pct=100.0 if "kl" in metrics else None)
    row["prefill_tok_s"] = _num(metrics, "speed", "prefill_tok_s", column)
    row["decode_tok_s"] = _num(metrics, "speed", "decode_tok_s", column)
    return row


COLUMNS = [("variant", "variant", "{}"), ("bpw", "bits/weight (linears)", "{:.3f}"),
           ("model_mib", "model MiB", "{:.2f}"), ("perplexity", "perplexity", "{:.4f}"),
           ("ppl_increase_pct", "Δppl %", "{:+.2f}"), ("kl_mean", "KL mean", "{:.5f}"),
           ("kl_p99", "KL p99", "{:.4f}"), ("same_top1_pct", "same top-1 %", "{:.2f}"),
           ("prefill_tok_s", "prefill tok/s", "{:.0f}"), ("decode_tok_s", "decode tok/s", "{:.1f}")]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a GitHub markdown table, columns without any value left out."""
    cols = [c for c in COLUMNS if any(r.get(c[0]) is not None and not (isinstance(r.get(c[0]), float)
                                                                         and math.isnan(r[c[0]])) for r in rows)]
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |",
             "|" + "|".join("---" if k == "variant" else "---:" for k, _, _ in cols) + "|"]
    for r in rows:
        cells = []
        for key, _, fmt in cols:
            v = r.get(key)
            cells.append("" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Perplexity and mean KL against bits per weight; the original as a dashed line."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    original, variants = rows[0], [r for r in rows[1:] if r.get("bpw") is not None]
    panels = [("perplexity", "perplexity", False)]
    if any(r.get("kl_mean") is not None for r in variants):
        panels.append(("kl_mean", "mean KL(original ‖ quantized)", True))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.6), squeeze=False)
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in variants:
        groups.setdefault(r["quantizer"], []).append(r)
    for ax, (key, ylabel, log) in zip(axes[0], panels):
        for name, group in groups.items():
            pts = sorted((r["bpw"], r[key], r["variant"]) for r in group
                         if r.get(key) is not None and (r[key] > 0 or not log))
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
            for x, y, label in pts:
                ax.annotate(label.removeprefix(name).strip() or label, (x, y), textcoords="offset points",
                            xytext=(4, 4), fontsize=8)
        if key == "perplexity" and original.get("perplexity") is not None:
            ax.axhline(original["perplexity"], color="0.3", linestyle="--",
                       label=f"original ({original['perplexity']:.3f})")
        if key == "kl_mean":
            ax.text(0.02, 0.02, "original: KL = 0", transform=ax.transAxes, fontsize=8, color="0.3")
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("bits per weight (quantized linears)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def compare(model: str | Path | None, variants: list[Variant], *, evaluators: list[Spec],
            out: Path, device: str = "cpu", artifacts: bool = False, cache: bool = True,
            on_variant: Callable[[int, int, str], None] | None = None, **run_kwargs: Any) -> CompareResult:
    """Run every variant, then write ``compare.md``, ``compare.json`` and ``compare.png`` into ``out``."""
    from ..pipeline.components import make
    from ..pipeline.run import run

    evals = list(evaluators)
    names = [n for n, _ in evals]
    if "size" not in names:
        evals.append(("size", {}))
    if not {"perplexity", "kl"} & set(names):
        raise UsageError("compare needs a quality evaluator: add --evaluator kl or --evaluator perplexity")
    for n, o in evals:  # check every evaluator and option before the first variant runs
        make("evaluator", n, o)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    notes: list[str] = []
    model_name = Path(str(model)).name if model is not None else "pycode-7m"
    for i, v in enumerate(variants):
        if on_variant is not None:
            on_variant(i, len(variants), v.label)
        args = {**run_kwargs, **v.run_args}
        r = run(model, **args, evaluators=evals, out=(out / v.label.replace(" ", "-")) if artifacts else None,
                overwrite=True, device=device, cache=cache, progress=False)
        if not rows:
            rows.append(_row("original", "original", r.metrics, "original"))
        column = "artifact" if artifacts and any("artifact" in c for m in r.metrics.values() for c in m.values()) \
            else "quantized"
        rows.append(_row(v.label, v.quantizer, r.metrics, column))
        notes += [f"{v.label}: {n}" for n in r.notes if n.startswith("MISMATCH") or n.startswith("fallback")]
        results.append({"variant": v.label, "run": {k: str(val) for k, val in v.run_args.items()},
                        "metrics": r.metrics, "seconds": r.seconds})
    base = rows[0].get("perplexity")
    for r in rows:
        if base and r.get("perplexity") is not None:
            r["ppl_increase_pct"] = 100.0 * (r["perplexity"] / base - 1.0)
    title = f"{model_name}: quality vs size ({_describe_text(results[0]['metrics'])}; {device})"
    table = out / "compare.md"
    body = f"# {title}\n\n" + markdown_table(rows) + "".join(f"\n- {n}" for n in notes) + ("\n" if notes else "")
    tmp = table.with_name(f".{table.name}.tmp-{os.getpid()}")
    tmp.write_text(body)
    tmp.replace(table)
    data = out / "compare.json"
    write_json_atomic(data, {"model": str(model or model_name), "evaluators": [[n, dict(o)] for n, o in evals],
                             "rows": rows, "variants": results, "notes": notes})
    png = out / "compare.png" if can_plot() else None
    if png is not None:
        plot(rows, png, title)
    return CompareResult(str(model or model_name), rows, table, png, data, notes)


def _describe_text(metrics: Mapping[str, Any]) -> str:
    """Which text, protocol and window each quality metric used (from the first variant's results)."""
    parts = []
    for ev in ("perplexity", "kl"):
        col = {k: v.get("quantized") for k, v in metrics.get(ev, {}).items()}
        if col.get("text"):
            parts.append(f"{ev}: {col['text']}, {col['protocol']} protocol, ctx {col['ctx']}")
    return "; ".join(parts) or "no text"

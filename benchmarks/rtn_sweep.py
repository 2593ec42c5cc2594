"""RTN quality sweep: perplexity, size and wall time of round-to-nearest quantization.

For every model: the original is evaluated once per text; then, for each format, the model is
quantized with ``quantfoundry.pipeline.run.run`` (rtn quantizer, qf exporter, artifact written
to a temporary folder) and the in-memory quantized model is evaluated with the built-in
perplexity and size evaluators (default perplexity protocol: non-overlapping windows of
min(context, 2048), no BOS, first 50,000 tokens, float32).

Finished rows are cached in the JSON file; a rerun only computes what is missing, so the slow
SmolLM2 evaluations can be run in pieces::

    python benchmarks/rtn_sweep.py                                   # everything
    python benchmarks/rtn_sweep.py --models pycode-7m --texts python # a subset
    python benchmarks/rtn_sweep.py --retime --repeats 3              # re-measure wall times only
    python benchmarks/rtn_sweep.py --table-only                      # re-render the markdown
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import core_version, cpu_name
from quantfoundry import EvalTarget, ModelSource, resolve_model
from quantfoundry.builtin.perplexity import PerplexityEvaluator, PerplexityOptions
from quantfoundry.builtin.size import SizeEvaluator
from quantfoundry.pipeline.run import run
from quantfoundry.toolkit import load_full_model
from torch import nn

HERE = Path(__file__).resolve().parent
#: ``../shared`` beside the project (``QF_SHARED`` names another copy, e.g. on a machine without it)
SHARED = Path(os.environ.get("QF_SHARED", Path(__file__).resolve().parent.parent.parent / "shared"))
SMOLLM2_BUILD = SHARED / "models/smollm2-135m-instruct-q4_1-dequant/build.sh"

MODELS: dict[str, str] = {
    "pycode-7m": str(SHARED / "models/pycode-7m"),
    "stories260K": str(SHARED / "models/stories260K"),
    "smollm2-135m": "build.sh",  # resolved by running SMOLLM2_BUILD (prints the built folder)
}
BASELINES = {"pycode-7m": "bf16", "stories260K": "fp32", "smollm2-135m": "Q4_1-dequantized (bf16)"}
TEXTS: dict[str, Path] = {
    "wikitext2": SHARED / "data/wikitext-2-raw/wiki.test.raw",
    "python": SHARED / "data/python-code/cpython311_stdlib_sample.py",
    "tinystories": SHARED / "data/tinystories-valid-excerpt/tinystories_valid_excerpt.txt",
}
TEXTS_OF = {"pycode-7m": ["wikitext2", "python"], "stories260K": ["wikitext2", "python", "tinystories"],
            "smollm2-135m": ["wikitext2", "python"]}
FORMATS = ["int8", "int4-g128", "int4-g32", "int3-g128"]
CPU = torch.device("cpu")


# -- helpers ---------------------------------------------------------------------------------
def model_folder(name: str) -> Path:
    if MODELS[name] != "build.sh":
        return Path(MODELS[name])
    out = subprocess.run(["bash", str(SMOLLM2_BUILD)], check=True, capture_output=True, text=True).stdout
    return Path(out.strip().splitlines()[-1])


def load_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {"rows": {}}


def save_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def block_linears(source: ModelSource) -> list[str]:
    return [n for n in source.linear_shapes() if source.is_block_linear(n)]


def retie(model: nn.Module, source: ModelSource) -> bool:
    """Share the output head with the embeddings when the config ties them.

    The pipeline's materialize step gives ``lm_head.weight`` its own Parameter even for tied
    models, so the size evaluator would count the embedding matrix twice (see docs/benchmarks.md).
    """
    if not getattr(source.config.get_text_config(), "tie_word_embeddings", False):
        return False
    out, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or emb is None or not isinstance(out.weight, nn.Parameter):
        return False
    assert torch.equal(out.weight, emb.weight), "tied weights differ"
    out.weight = emb.weight
    return True


def size_metrics(target: EvalTarget, source: ModelSource) -> dict[str, Any]:
    """Size evaluator figures (tied head counted once) and, for tied models, the raw figures."""
    raw = SizeEvaluator().evaluate(target)
    if not retie(target.model, source):
        return dict(raw)
    fixed = SizeEvaluator().evaluate(target)
    return {**fixed, "as_reported_by_size_evaluator": dict(raw)}


def perplexity(target: EvalTarget, text: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    m = PerplexityEvaluator(PerplexityOptions(path=TEXTS[text])).evaluate(target)
    return {"perplexity": m["perplexity"], "nll": m["nll"], "tokens": m["tokens"], "window": m["ctx"],
            "text_sha256": m["text_sha256"], "eval_seconds": round(time.perf_counter() - t0, 2)}


def effective_formats(result: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for entry in result.plan.quantized().values():
        counts[entry.format.spec] = counts.get(entry.format.spec, 0) + 1
    return counts


def dir_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and f.suffix == ".safetensors")


# -- one row ---------------------------------------------------------------------------------
def evaluate_row(row: dict[str, Any], target: EvalTarget, source: ModelSource, texts: list[str],
                 data: dict[str, Any], out: Path) -> None:
    if "model_bytes" not in row:
        row.update(size_metrics(target, source))
    for text in texts:
        if text in row["perplexity"]:
            continue
        row["perplexity"][text] = perplexity(target, text)
        print(f"  {row['model']:>13} {row['format']:>10} {text:>11}: ppl {row['perplexity'][text]['perplexity']:.3f}"
              f" ({row['perplexity'][text]['eval_seconds']:.0f} s)", flush=True)
        save_json(out, data)


def quantize(folder: Path, fmt: str, repeats: int) -> tuple[Any, dict[str, Any]]:
    """Quantize+export ``repeats`` times (artifact to a temporary folder); the last result and timings."""
    times, load = [], os.getloadavg()[0]
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="qf-rtn-sweep-") as tmp:
            result = run(model=str(folder), quantizer="rtn", format=fmt, evaluators=[], keep_model=True,
                         out=Path(tmp) / "artifact", overwrite=True, progress=False)
            artifact_bytes = dir_bytes(Path(tmp) / "artifact")
        times.append(round(result.seconds, 3))
    return result, {"quantize_seconds": min(times), "quantize_seconds_all": times, "loadavg_1m_before": load,
                    "timed_with": core_version(), "artifact_safetensors_bytes": artifact_bytes,
                    "effective_formats": effective_formats(result), "notes": result.notes}


def sweep_model(name: str, formats: list[str], texts: list[str], data: dict[str, Any], out: Path,
                repeats: int, retime: bool) -> None:
    texts = [t for t in TEXTS_OF[name] if t in texts]
    rows = data["rows"]
    todo = [f for f in ["original", *formats]
            if any(t not in rows.get(f"{name}/{f}", {}).get("perplexity", {}) for t in texts)
            or (retime and f != "original")]
    if not todo:
        print(f"{name}: cached", flush=True)
        return
    folder = model_folder(name)
    source = resolve_model(folder)
    tokenizer = source.tokenizer()
    for fmt in todo:
        key = f"{name}/{fmt}"
        row = rows.setdefault(key, {"model": name, "baseline": BASELINES[name], "format": fmt, "perplexity": {}})
        row.setdefault("quantfoundry", core_version())
        if fmt == "original":
            model = load_full_model(source, dtype=torch.float32, device=CPU)
            info = {"quantized_linears": block_linears(source)}
            row["storage_dtype"] = str(source.storage_dtype).removeprefix("torch.")
        else:
            result, timing = quantize(folder, fmt, repeats)
            model = result.model
            info = {"quantized_linears": list(result.plan.quantized())}
            row.update(timing)
            print(f"  {name:>13} {fmt:>10} quantize+export: {timing['quantize_seconds_all']} s", flush=True)
        target = EvalTarget(model, tokenizer, source, "original" if fmt == "original" else "quantized", CPU,
                            float_dtype=source.storage_dtype, info=info)
        evaluate_row(row, target, source, texts, data, out)
        save_json(out, data)
        del model, target


# -- markdown --------------------------------------------------------------------------------
def render_table(data: dict[str, Any]) -> str:
    lines: list[str] = []
    for name in MODELS:
        rows = [data["rows"][k] for k in data["rows"] if k.startswith(name + "/")]
        if not rows:
            continue
        texts = [t for t in TEXTS_OF[name] if any(t in r["perplexity"] for r in rows)]
        base = data["rows"].get(f"{name}/original", {}).get("perplexity", {})
        lines += [f"**{name}** (baseline: {rows[0]['baseline']})", "",
                  "| format | stored as | linear bpw | model bpw | model MB | "
                  + " | ".join(f"ppl {t}" for t in texts) + " | quantize+export s |",
                  "|---|---|---:|---:|---:|" + "---:|" * len(texts) + "---:|"]
        order = {f: i for i, f in enumerate(["original", *FORMATS])}
        for r in sorted(rows, key=lambda r: order.get(r["format"], 99)):
            stored = ", ".join(f"{n}× {s}" for s, n in r.get("effective_formats", {}).items()) or "—"
            cells = []
            for t in texts:
                p = r["perplexity"].get(t)
                if p is None:
                    cells.append("")
                elif r["format"] == "original" or t not in base:
                    cells.append(f"{p['perplexity']:.3f}")
                else:
                    delta = 100 * (p["perplexity"] / base[t]["perplexity"] - 1)
                    cells.append(f"{p['perplexity']:.3f} ({delta:+.1f}%)")
            secs = f"{r['quantize_seconds']:.2f}" if "quantize_seconds" in r else "—"
            lines.append(f"| {r['format']} | {stored} | {r.get('linear_bpw', float('nan')):.3f} | "
                         f"{r.get('model_bpw', float('nan')):.3f} | {r.get('model_bytes', 0) / 1e6:.3f} | "
                         + " | ".join(cells) + f" | {secs} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--texts", nargs="+", choices=list(TEXTS), default=list(TEXTS))
    ap.add_argument("--formats", nargs="+", default=FORMATS)
    ap.add_argument("--out", type=Path, default=HERE / "results/rtn_sweep.json")
    ap.add_argument("--repeats", type=int, default=1, help="quantize+export this many times, keep the fastest")
    ap.add_argument("--retime", action="store_true", help="re-measure quantize+export of cached rows (no re-eval)")
    ap.add_argument("--table-only", action="store_true", help="only re-render the markdown table from the JSON")
    args = ap.parse_args()

    data = load_json(args.out)
    data["machine"] = {"cpu": cpu_name(), "cores": os.cpu_count(),
                       "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                       "python": platform.python_version(), "quantfoundry": core_version()}
    if not args.table_only:
        for name in args.models:
            sweep_model(name, args.formats, args.texts, data, args.out, args.repeats, args.retime)
        save_json(args.out, data)
    table = render_table(data)
    args.out.with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()

"""Mixed precision at llama.cpp's file sizes: qf's ``--planner kl`` GGUF vs llama.cpp's own mixes,
scored by llama.cpp (``llama-perplexity`` KL divergence against the F16 conversion).

Per model (``prepare_base`` of ``gptq_gguf.py``): the in-domain text cut at 60%; llama.cpp's
imatrix from the first part (``llama-imatrix``, 128 × 512 tokens); every file scored on the
held-out part against the same F16 logits. For each llama.cpp file type, ``llama-quantize
--imatrix`` writes its file; qf then plans a GGUF whose tensors take at most the same bytes
(``--target-size`` = that file's tensor bytes, lowered by the difference if qf's file still came
out larger) with the same imatrix (``--exporter-opt imatrix=``) and round-to-nearest rounding, so
the two files differ only in which tensor got which type. ``--curve`` adds qf's planner at
2.5 … 6.5 bpw and llama.cpp's fixed file types, plotted to ``docs/mixed-<model>.png``.

    python benchmarks/mixed_precision.py [--models pycode-7m smollm2-135m] [--types Q2_K Q3_K_M Q4_K_M Q5_K_M]
        [--quantizers rtn gptq] [--sensitivity measured|scaled] [--exclude Q4_1] [--curve] [--table-only]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import quantfoundry
from _common import core_version, cpu_name
from gguf_vs_llama_quantize import KLD_LINES, bpw, llama_cpp, run_cmd, tensors_of
from gptq_gguf import PPL_ARGS, WORK, parse_retrying, prepare_base
from gptq_vs_peer import split_text
from qf_gguf.exporter import MIX_TYPES, MIX_TYPES_32
from quantfoundry.errors import UsageError
from rtn_sweep import model_folder

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "mixed_precision.json"
DOCS = HERE.parent / "docs"
SIZES = ["Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M"]
CURVE_TYPES = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K"]
CURVE_BPW = [2.5, 2.75, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0, 6.5]
THREADS = 2


def tensor_bytes(path: Path) -> int:
    return sum(t[3] for t in tensors_of(path).values())


def score(file: Path, kld_base: Path) -> dict[str, Any]:
    bin_dir, _ = llama_cpp()
    tensors = tensors_of(file)
    types: dict[str, int] = {}
    for typ, *_ in tensors.values():
        types[typ] = types.get(typ, 0) + 1
    return {"file_bytes": file.stat().st_size, "tensor_bytes": sum(t[3] for t in tensors.values()),
            "bpw": round(bpw(tensors), 4), "types": types,
            **parse_retrying([bin_dir / "llama-perplexity", "-m", file, "--kl-divergence-base", kld_base,
                              "--kl-divergence", *PPL_ARGS], KLD_LINES)}


def llama_file(model: str, ftype: str, base: Path, imat: Path) -> Path:
    bin_dir, _ = llama_cpp()
    out = WORK / model / f"{ftype}-llamacpp-imatrix.gguf"
    if not out.exists():
        run_cmd([bin_dir / "llama-quantize", "--imatrix", imat, base, out, ftype, str(THREADS)])
    return out


def qf_file(model: str, label: str, quantizer: str, imat: Path, calib: Path, sensitivity: str, *,
            target_size: int | None = None, target_bpw: float | None = None,
            exclude: tuple[str, ...] = ()) -> tuple[Path, dict[str, Any]]:
    out = WORK / model / f"qf-kl-{quantizer}-{sensitivity}-{label}{''.join('-no-' + t for t in exclude)}"
    options: dict[str, Any] = {"sensitivity": sensitivity}
    if exclude:
        options["formats"] = ",".join(t for t in dict.fromkeys(MIX_TYPES + MIX_TYPES_32) if t not in exclude)
    t0 = time.perf_counter()
    r = quantfoundry.run(str(model_folder(model)), quantizer=quantizer, exporter="gguf",
                         exporter_options={"imatrix": str(imat)}, planner="kl", planner_options=options,
                         target_size=target_size, target_bpw=target_bpw,
                         calibrator_options={"path": str(calib), "n_samples": 128, "seq_len": 512},
                         evaluators=[], out=str(out), overwrite=True, progress=False)
    planner = dict(r.manifest["planner"])
    planner.pop("table", None)
    return out / "model.gguf", {**planner, "seconds": round(time.perf_counter() - t0, 1)}


def at_size(model: str, ftype: str, quantizer: str, imat: Path, calib: Path, kld_base: Path,
            sensitivity: str, theirs: dict[str, Any], exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """qf's planned file no larger than llama.cpp's: the target lowered by any excess (GGUF
    alignment padding and metadata are not in the planner's budget)."""
    target = theirs["tensor_bytes"]
    for _ in range(3):
        file, planner = qf_file(model, ftype, quantizer, imat, calib, sensitivity, target_size=target,
                                exclude=exclude)
        size = file.stat().st_size
        if size <= theirs["file_bytes"]:
            break
        target -= size - theirs["file_bytes"]
    return {**score(file, kld_base), "planner": planner}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["pycode-7m"])
    ap.add_argument("--types", nargs="+", default=SIZES)
    ap.add_argument("--quantizers", nargs="+", default=["rtn"], choices=["rtn", "gptq", "awq"])
    ap.add_argument("--sensitivity", default="measured", choices=["measured", "scaled"])
    ap.add_argument("--exclude", nargs="*", default=[], help="GGML types the planner may not choose (e.g. Q4_1)")
    ap.add_argument("--curve", action="store_true", help="also the KLD-vs-bpw curve (qf 2.5 … 6.5 bpw)")
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--redo", action="store_true")
    args = ap.parse_args()
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"rows": {}, "curves": {}}
    if not args.table_only:
        for model in args.models:
            calib, _held = split_text(model)
            base, imat, kld_base = prepare_base(model)
            for ftype in args.types:
                key = f"{model}|{ftype}"
                row = {} if args.redo else data["rows"].get(key, {})
                if "llama.cpp imatrix" not in row:
                    row["llama.cpp imatrix"] = score(llama_file(model, ftype, base, imat), kld_base)
                for q in args.quantizers:
                    tag = f"qf kl {q} {args.sensitivity}" + "".join(f" no-{t}" for t in args.exclude)
                    if tag not in row:
                        row[tag] = at_size(model, ftype, q, imat, calib, kld_base, args.sensitivity,
                                           row["llama.cpp imatrix"], tuple(args.exclude))
                data["rows"][key] = row
                print(key, json.dumps({k: {m: v.get(m) for m in ("file_bytes", "bpw", "kld_mean")}
                                       for k, v in row.items()}), flush=True)
                _save(data)
            if args.curve:
                curve = data["curves"].setdefault(model, {"llama.cpp imatrix": {}, f"qf kl rtn {args.sensitivity}": {}})
                for ftype in CURVE_TYPES:
                    if ftype not in curve["llama.cpp imatrix"]:
                        curve["llama.cpp imatrix"][ftype] = score(llama_file(model, ftype, base, imat), kld_base)
                        _save(data)
                ours = curve.setdefault(f"qf kl rtn {args.sensitivity}", {})
                for target in CURVE_BPW:
                    if str(target) not in ours:
                        try:
                            file, planner = qf_file(model, f"{target}bpw", "rtn", imat, calib, args.sensitivity,
                                                    target_bpw=target)
                        except UsageError as exc:  # below the smallest plan the GGML types allow
                            print(f"{model} {target} bpw: {exc}", flush=True)
                            continue
                        ours[str(target)] = {**score(file, kld_base), "planner": planner}
                        _save(data)
                plot(model, curve)
    print(table(data))


def _save(data: dict[str, Any]) -> None:
    data.update(machine=cpu_name(), **core_version())
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=1))


def plot(model: str, curve: dict[str, dict[str, Any]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, points in curve.items():
        pts = sorted((p["bpw"], p["kld_mean"], name) for name, p in points.items())
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if label.startswith("qf") else "s--", label=label)
        if label.startswith("llama"):
            for x, y, name in pts:
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(3, 4), fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (tensor bytes × 8 / parameters)")
    ax.set_ylabel("mean KL divergence to F16 (llama-perplexity)")
    ax.set_title(f"{model}: qf --planner kl vs llama.cpp's mixes (same imatrix)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = DOCS / f"mixed-{model}.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def table(data: dict[str, Any]) -> str:
    lines = ["| model | llama.cpp size | method | file bytes | bpw | KLD mean | same top-1 % | KLD vs llama.cpp |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for key, row in data["rows"].items():
        model, ftype = key.split("|")
        ref = row.get("llama.cpp imatrix")
        for method, q in row.items():
            rel = f"{q['kld_mean'] / ref['kld_mean']:.2f}x" if ref and method != "llama.cpp imatrix" else ""
            lines.append(f"| {model} | {ftype} | {method} | {q['file_bytes']:,} | {q['bpw']:.3f} | "
                         f"{q['kld_mean']:.5f} | {q['same_top_p_pct']:.2f} | {rel} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""Issue 21: where the time of ``qf run --quantizer {rtn,gptq,awq} --exporter gguf`` goes, with
the GGML encoders in numba (``qf_gguf.native``, the default on CPU) and in torch (the fallback,
``QF_GGUF_NATIVE=0``), side by side on the same machine, plus llama.cpp's score of each file.

Each run is ``quantfoundry.run`` in a fresh Python process (``--one``), as a user's ``qf run``
is, with the calibration of ``gptq_gguf.py`` (the model's in-domain text cut at 60%: 128 windows
x 512 tokens of the first part) and no evaluator; its ``RunResult.timings`` split the wall time
into phases (``load``, ``calibrate``, ``quantize``, ``search``, ``encode``, ``export``), and
the process's own start-up (imports, numba's cached machine code) is the ``startup`` column.
Each file is then scored by ``llama-perplexity`` (KL divergence against llama.cpp's F16
conversion on the held-out 40%, ctx 512) with ``gptq_gguf.py``'s files, so the quality of the
two encoder paths is checked to be the same (the bytes are: ``tests``).

    python benchmarks/gguf_profile.py [--quantizers rtn gptq awq] [--types Q4_K_M] [--backends native torch]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "gguf_profile.json"
WORK = HERE / ".cache" / "gguf-profile"
PHASES = ("load", "calibrate", "quantize", "search", "encode", "export")


def one(model: str, quantizer: str, ftype: str, out: Path, calib: str, threads: int | None, device: str,
        dtype: str = "float32") -> dict:
    """One run; ``quantizer`` is a name or ``name:key=value,...`` (its options)."""
    t0 = time.perf_counter()
    import quantfoundry
    from quantfoundry import QuantLinear
    from rtn_sweep import model_folder

    startup = time.perf_counter() - t0
    name, _, rest = quantizer.partition(":")
    qopts = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in rest.split(",") if kv)}
    cal = {"calibrator_options": {"path": calib, "n_samples": 128, "seq_len": 512}} if name != "rtn" else {}
    r = quantfoundry.run(str(model_folder(model)), quantizer=[(name, qopts)], exporter="gguf",
                         exporter_options={"type": ftype}, evaluators=[], out=str(out), overwrite=True,
                         progress=False, threads=threads, keep_model=True, device=device, dtype=dtype, **cal)
    # what AWQ's searches chose, per linear (the scale's alpha is its input group's)
    chosen = {n: {k: v for k, v in (m.qweight.meta or {}).get("awq", {}).items() if k in ("alpha", "clip_loss_after")}
              for n, m in r.model.named_modules() if isinstance(m, QuantLinear) and (m.qweight.meta or {}).get("awq")}
    return {"seconds": r.seconds, "startup": startup, "timings": r.timings, "chosen": chosen}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["pycode-7m"])
    ap.add_argument("--quantizers", nargs="+", default=["rtn", "gptq", "awq", "awq:exact_search=true"],
                    help="names, or name:key=value,... with the quantizer's options (values as JSON)")
    ap.add_argument("--types", nargs="+", default=["Q4_K_M"])
    ap.add_argument("--backends", nargs="+", default=["native", "torch"])
    ap.add_argument("--threads", type=int, default=None, help="the exporter's threads option (default: all cores)")
    ap.add_argument("--no-score", action="store_true", help="skip llama.cpp's KL divergence of each file")
    ap.add_argument("--results", type=Path, default=RESULTS, help="the JSON file the rows are added to")
    ap.add_argument("--device", default="cpu", help="the run's device (cpu, cuda); rows off the CPU are keyed with it")
    ap.add_argument("--dtype", default="float32", help="the block work's dtype (qf run --dtype); other than float32, "
                                                       "rows are keyed with it")
    ap.add_argument("--one", nargs=4, metavar=("MODEL", "QUANTIZER", "TYPE", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--calib", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(*args.one[:3], Path(args.one[3]), args.calib, args.threads, args.device,
                                         args.dtype)))
        return

    from _common import core_version, cpu_name
    from gptq_vs_peer import split_text

    data = json.loads(args.results.read_text()) if args.results.exists() else {"rows": {}}
    for model in args.models:
        calib, _ = split_text(model)
        for quantizer in args.quantizers:
            for ftype in args.types:
                for backend in args.backends:
                    key = f"{model}|{quantizer}|{ftype}|{backend}" + ("" if args.device == "cpu" else f"|{args.device}") \
                        + ("" if args.dtype == "float32" else f"|{args.dtype}")
                    out = WORK / key.replace("|", "-")
                    env = {**os.environ, "QF_GGUF_NATIVE": "1" if backend == "native" else "0"}
                    cmd = [sys.executable, __file__, "--one", model, quantizer, ftype, str(out), "--calib", str(calib),
                           "--device", args.device, "--dtype", args.dtype]
                    if args.threads is not None:
                        cmd += ["--threads", str(args.threads)]
                    t0 = time.perf_counter()
                    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=HERE)
                    wall = time.perf_counter() - t0
                    if p.returncode != 0:
                        raise SystemExit(f"{key} failed:\n{p.stderr[-3000:]}")
                    row = json.loads(next(ln for ln in p.stdout.splitlines() if ln.startswith("RESULT "))[7:])
                    row["process_wall"] = wall
                    if not args.no_score:
                        row.update(score(model, out / "model.gguf"))
                    data["rows"][key] = row
                    print(key, json.dumps(row), flush=True)
                    data.update(machine=cpu_name(), cores=os.cpu_count(), **core_version())
                    args.results.parent.mkdir(parents=True, exist_ok=True)
                    args.results.write_text(json.dumps(data, indent=1))
    print(table(data))


def score(model: str, file: Path) -> dict:
    """llama.cpp's KL divergence against ``gptq_gguf.py``'s F16 base on the held-out text."""
    from gguf_vs_llama_quantize import KLD_LINES, llama_cpp
    from gptq_gguf import PPL_ARGS, parse_retrying, prepare_base

    bin_dir, _ = llama_cpp()
    _, _, kld_base = prepare_base(model)
    return parse_retrying([bin_dir / "llama-perplexity", "-m", file, "--kl-divergence-base", kld_base,
                           "--kl-divergence", *PPL_ARGS], KLD_LINES)


def table(data: dict) -> str:
    lines = ["| model | quantizer | type | encoders | whole run s | " + " | ".join(PHASES) + " | start-up s | KLD |",
             "|---|---|---|---|---:|" + "---:|" * len(PHASES) + "---:|---:|"]
    for key, row in data["rows"].items():
        model, quantizer, ftype, backend, *extra = key.split("|")
        backend += f" ({', '.join(extra)})" if extra else ""
        t = row["timings"]
        kld = f"{row['kld_mean']:.5f}" if "kld_mean" in row else "—"
        lines.append(f"| {model} | {quantizer} | {ftype} | {backend} | {row['seconds']:.1f} | "
                     + " | ".join(f"{t.get(p, 0.0):.1f}" for p in PHASES) + f" | {row['startup']:.1f} | {kld} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

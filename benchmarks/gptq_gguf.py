"""GPTQ on llama.cpp's K-quant mixes vs llama.cpp's own quantization, at the same file size,
scored by llama.cpp (``llama-perplexity`` PPL and KL divergence against the F16 conversion).

Per model, the in-domain text is cut at 60% on a line boundary (as ``gptq_vs_peer.py``): both
sides calibrate on the first part — llama.cpp with ``llama-imatrix -c 512 --chunks 128``
(65,536 tokens), qf's ``gptq`` on 128 windows × 512 tokens of the same file — and llama.cpp
scores every file on the held-out part (ctx 512, first 40 chunks). Rows per file type:
``llama-quantize`` without and with the imatrix, and ``qf run --quantizer gptq --exporter gguf``
(the same mix: the same type for every tensor, hence the same size; the token embedding and
output are RTN-rounded by the pipeline, with the Hessian diagonal's imatrix absent).

    python benchmarks/gptq_gguf.py [--models pycode-7m] [--types Q4_K_M Q3_K_M Q2_K] [--quantizers gptq awq]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import quantfoundry
from _common import core_version, cpu_name
from gguf_vs_llama_quantize import (
    KLD_LINES,
    PPL_LINE,
    THREADS,
    bpw,
    llama_cpp,
    parse_run,
    run_cmd,
    tensors_of,
)
from gptq_vs_peer import split_text
from rtn_sweep import model_folder

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "gptq_gguf.json"
WORK = HERE / ".cache" / "gptq-gguf"
PPL_ARGS = ["-c", "512", "-b", "512", "-t", str(THREADS)]
CHUNKS = ["--chunks", "40"]  # the KL runs take the base file's chunk count


def parse_retrying(argv: list, patterns: dict[str, str], tries: int = 4) -> dict[str, float]:
    """``parse_run`` (3 attempts each), again: llama.cpp's asynchronous logger drops its last
    lines more often when the machine is busy."""
    for attempt in range(tries):
        try:
            return parse_run(argv, patterns)
        except SystemExit:
            if attempt == tries - 1:
                raise
    raise AssertionError


def prepare_base(model: str) -> tuple[Path, Path, Path]:
    """llama.cpp's F16 conversion of ``model``, its imatrix on the calibration part and the KL
    base on the held-out part (made once, under ``WORK``)."""
    bin_dir, src = llama_cpp()
    work = WORK / model
    work.mkdir(parents=True, exist_ok=True)
    calib, held = split_text(model)
    base, imat, kld_base = work / "base-f16.gguf", work / "imatrix.gguf", work / "base.kld"
    if not kld_base.exists():
        run_cmd([sys.executable, src / "convert_hf_to_gguf.py", model_folder(model), "--outtype", "f16",
                 "--outfile", base])
        run_cmd([bin_dir / "llama-imatrix", "-m", base, "-f", calib, "-c", "512", "--chunks", "128",
                 "-t", str(THREADS), "-o", imat])
        run_cmd([bin_dir / "llama-perplexity", "-m", base, "-f", held, *PPL_ARGS, *CHUNKS,
                 "--kl-divergence-base", kld_base])
    return base, imat, kld_base


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["pycode-7m"])
    ap.add_argument("--types", nargs="+", default=["Q4_K_M", "Q3_K_M", "Q2_K"])
    ap.add_argument("--quantizers", nargs="+", default=["gptq"], choices=["gptq", "awq"],
                    help="qf quantizers to add to each row (llama.cpp's rows are measured once)")
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--redo", action="store_true", help="measure rows already in the results again")
    args = ap.parse_args()
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"rows": {}}
    if not args.table_only:
        bin_dir, src = llama_cpp()
        for model in args.models:
            work = WORK / model
            folder = model_folder(model)
            calib, held = split_text(model)
            base, imat, kld_base = prepare_base(model)
            base_ppl = parse_run([bin_dir / "llama-perplexity", "-m", base, "-f", held, *PPL_ARGS, *CHUNKS], PPL_LINE)["ppl"]

            def score(file: Path, kld_base: Path = kld_base) -> dict:
                return {"size_bytes": file.stat().st_size, "bpw": round(bpw(tensors_of(file)), 4),
                        **parse_retrying([bin_dir / "llama-perplexity", "-m", file, "--kl-divergence-base", kld_base,
                                     "--kl-divergence", *PPL_ARGS], KLD_LINES)}

            for ftype in args.types:
                key = f"{model}|{ftype}"
                row = data["rows"].get(key) if not args.redo else None
                if row is None:
                    row = {"base_ppl": base_ppl}
                    for tag, extra in (("llama.cpp", []), ("llama.cpp imatrix", ["--imatrix", imat])):
                        out = work / f"{ftype}-{tag.replace(' ', '-').replace('.', '')}.gguf"
                        run_cmd([bin_dir / "llama-quantize", *extra, base, out, ftype, str(THREADS)])
                        row[tag] = score(out)
                for quantizer in args.quantizers:
                    if f"qf {quantizer}" in row:
                        continue
                    out = work / f"qf-{quantizer}-{ftype}"
                    r = quantfoundry.run(str(folder), quantizer=quantizer, exporter="gguf",
                                         exporter_options={"type": ftype},
                                         calibrator_options={"path": str(calib), "n_samples": 128, "seq_len": 512},
                                         evaluators=[], out=str(out), overwrite=True, progress=False)
                    row[f"qf {quantizer}"] = {**score(out / "model.gguf"), "seconds": round(r.seconds, 1)}
                data["rows"][key] = row
                print(model, ftype, json.dumps(row), flush=True)
                data.update(machine=cpu_name(), **core_version())
                RESULTS.write_text(json.dumps(data, indent=1))
    print(table(data))


def table(data: dict) -> str:
    lines = ["| model | type | method | bpw | PPL | KLD mean | same top-1 % |", "|---|---|---|---:|---:|---:|---:|"]
    for key, row in data["rows"].items():
        model, ftype = key.split("|")
        for method in ("llama.cpp", "llama.cpp imatrix", "qf gptq", "qf awq"):
            if method not in row:
                continue
            q = row[method]
            lines.append(f"| {model} | {ftype} | {method} | {q['bpw']:.3f} | {q['ppl_q_kld_run']:.4f} "
                         f"({row['base_ppl']:.4f}) | {q['kld_mean']:.5f} | {q['same_top_p_pct']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""Whole-file GGUF export time of ``qf run --exporter gguf``, per device, in one process.

Each row times ``quantfoundry.run(model, exporter="gguf", exporter_options={"type": T},
evaluators=[], device=D)``: reading the checkpoint, rounding every planned tensor onto its GGML
type (the K-quant searches), the block pass, and writing the file. The fastest of ``--repeats``
runs is kept, after one untimed warm-up per device. Ratios between devices in one run are the
figures; absolute seconds depend on the machine (recorded).

    python benchmarks/gguf_export_time.py --models pycode-7m llama-1.5g --devices cpu cuda
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import quantfoundry
import torch
from _common import core_version, cpu_name

HERE = Path(__file__).resolve().parent
TYPES = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K"]


def model_folder(name: str) -> Path:
    if name == "pycode-7m":
        from quantfoundry.data import default_model_path

        return Path(default_model_path())
    if name == "llama-1.5g":  # the random Llama of speed.py (hidden 2048, 22 layers, vocab 32000)
        from speed import model_folder as speed_model

        return Path(str(speed_model(name)))
    return Path(name)


def time_export(folder: Path, ftype: str, device: str, repeats: int) -> tuple[float, int]:
    best, size = float("inf"), 0
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            out = Path(tmp) / "q"
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            quantfoundry.run(str(folder), exporter="gguf", exporter_options={"type": ftype}, out=out,
                             evaluators=[], device=device, progress=False)
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
            size = (out / "model.gguf").stat().st_size
            shutil.rmtree(out)
    return best, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", default=["pycode-7m"])
    ap.add_argument("--types", nargs="*", default=TYPES)
    ap.add_argument("--devices", nargs="*", default=["cpu"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "gguf_export_time.json")
    args = ap.parse_args()
    rows: list[dict[str, Any]] = []
    for name in args.models:
        folder = model_folder(name)
        for device in args.devices:
            time_export(folder, args.types[0], device, 1)  # warm-up: imports, kernels, page cache
            for ftype in args.types:
                seconds, size = time_export(folder, ftype, device, args.repeats)
                rows.append({"model": name, "type": ftype, "device": device, "seconds": round(seconds, 3),
                             "bytes": size})
                print(f"{name:12s} {ftype:7s} {device:5s} {seconds:8.2f} s  {size / 2**20:8.1f} MiB", flush=True)
    machine = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "cores": os.cpu_count(),
               "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
               "torch": torch.__version__, **core_version()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    print(json.dumps(machine))


if __name__ == "__main__":
    main()

"""AWQ quantization wall time, qf vs llm-compressor's AWQModifier, side by side on one machine
(meant for the H100: ``--device cuda``): pycode-7m, and a config-built 1B-parameter Llama
(TinyLlama-1.1B shapes, random weights: only the time means anything).

Same calibration ids for both (128 × 512 tokens of the embedded Python text, drawn by qf's
``text`` calibrator), int4-g128 asymmetric, each tool's defaults otherwise (qf: 20 α points and
the clipping search; llm-compressor: duo scaling, 20 grid points, no clipping search — so qf
does more work per linear); float32, then bfloat16. qf's time is its whole ``run`` without export
or evaluation (model load included); the peer's its ``oneshot`` call (model load excluded), in a
subprocess with ``--peer-pythonpath`` prepended. A second qf row without clipping
(``clip=false``) is the like-for-like search.

    python benchmarks/awq_speed.py --device cuda --peer-pythonpath .devdeps-llmc --out results.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import quantfoundry as qf
import torch
from gptq_speed import LLAMA_1B, calibration, time_peer, time_qf
from quantfoundry import resolve_model
from quantfoundry.data import default_model_path
from quantfoundry.testing.tiny import build_tiny_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--peer-pythonpath", default=".devdeps-llmc")
    ap.add_argument("--models", nargs="+", default=["pycode-7m", "llama-1b"])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="awq-speed-"))
    results = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
               "torch": torch.__version__, "rows": {}}
    # warm-up (CUDA context, cuBLAS, kernels) before anything is timed
    qf.run(str(default_model_path()), quantizer="awq", out=None, progress=False, device=args.device,
           calibrator_options={"n_samples": 4, "seq_len": 64})
    for name in args.models:
        folder = default_model_path() if name == "pycode-7m" else build_tiny_model(work / name, "llama", **LLAMA_1B)
        ids = calibration(folder, work / f"{name}.ids.pt")
        row: dict = {"linear_params": sum(s[0] * s[1] for s in resolve_model(str(folder)).linear_shapes().values())}
        for dtype in args.dtypes:
            r = {"qf_seconds": time_qf(folder, args.device, dtype, quantizer="awq"),
                 "qf_seconds_noclip": time_qf(folder, args.device, dtype, quantizer="awq", clip=False),
                 "peer": time_peer(folder, ids, args.device, args.peer_pythonpath,
                                   work / f"{name}.{dtype}.peer.safetensors", dtype, script="llmc_awq.py")}
            if "seconds" in r["peer"]:
                r["ratio_qf_over_peer"] = r["qf_seconds"] / r["peer"]["seconds"]
                r["ratio_qf_noclip_over_peer"] = r["qf_seconds_noclip"] / r["peer"]["seconds"]
            row[dtype] = r
            print(name, dtype, json.dumps(r)[:300], flush=True)
        results["rows"][name] = row
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

"""GPTQ quantization wall time, qf vs llm-compressor's GPTQModifier, side by side on one machine
(meant for the H100: ``--device cuda``), on a config-built 1B-parameter Llama (TinyLlama-1.1B
shapes, random weights: only the time means anything) and on pycode-7m.

Same calibration ids for both (128 × 512 tokens of the embedded Python text, drawn by qf's
``text`` calibrator), int4-g128 asymmetric, no act-order, damping 0.01, block 128; the model in
float32 (qf's default compute dtype), then both again in bfloat16 (``--dtype``). qf's time is
its whole ``run`` without export or evaluation (model load from safetensors included); the
peer's is its ``oneshot`` call (model load excluded), run in a subprocess with
``--peer-pythonpath`` prepended (llm-compressor and what it needs beyond the machine's packages;
several paths separated by ``:``).

    python benchmarks/gptq_speed.py --device cuda --peer-pythonpath .devdeps-llmc --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import quantfoundry as qf
import torch
from quantfoundry import resolve_model
from quantfoundry.data import default_model_path
from quantfoundry.testing.tiny import build_tiny_model

HERE = Path(__file__).resolve().parent
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, head_dim=64, max_position_embeddings=2048)


def calibration(folder: Path, path: Path) -> Path:
    cls = qf.get_component("calibrator", "text")
    ids = cls(cls.Options(n_samples=128, seq_len=512)).load(resolve_model(str(folder)).tokenizer()).input_ids
    torch.save(ids, path)
    return path


def time_qf(folder: Path, device: str, dtype: str = "float32", quantizer: str = "gptq",
            fmt: str = "int4-g128", **options: bool) -> float:
    t0 = time.perf_counter()
    qf.run(str(folder), quantizer=quantizer, quantizer_options=options, format=fmt, out=None, progress=False,
           device=device, dtype=dtype, calibrator_options={"n_samples": 128, "seq_len": 512})
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def time_peer(folder: Path, ids: Path, device: str, pythonpath: str, out: Path, dtype: str = "float32",
              script: str = "llmc_gptq.py", group_size: int = 128) -> dict:
    paths = [str(Path(p).resolve()) for p in pythonpath.split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(HERE / "peers" / script), "--model", str(folder), "--calib-ids", str(ids),
           "--bits", "4", "--group-size", str(group_size), "--asym", "--device", device, "--out", str(out),
           "--dtype", dtype]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        return {"error": r.stderr[-2000:]}
    return json.loads(out.with_suffix(".json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--peer-pythonpath", default=".devdeps-llmc")
    ap.add_argument("--models", nargs="+", default=["pycode-7m", "llama-1b"])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gptq-speed-"))
    results = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
               "torch": torch.__version__, "rows": {}}
    # warm-up (CUDA context, cuBLAS, kernels) before anything is timed; the peer's subprocess
    # pays its own start-up outside the timed ``oneshot`` call
    qf.run(str(default_model_path()), quantizer="gptq", out=None, progress=False, device=args.device,
           calibrator_options={"n_samples": 4, "seq_len": 64})
    for name in args.models:
        folder = default_model_path() if name == "pycode-7m" else build_tiny_model(work / name, "llama", **LLAMA_1B)
        ids = calibration(folder, work / f"{name}.ids.pt")
        n_params = sum(s[0] * s[1] for s in resolve_model(str(folder)).linear_shapes().values())
        row = {"linear_params": n_params}
        row["qf_seconds"] = time_qf(folder, args.device)
        # llm-compressor quantizes all of a layer's linears on the float layer's inputs: qf's
        # closest setting is true_sequential=false
        row["qf_seconds_not_true_sequential"] = time_qf(folder, args.device, true_sequential=False)
        peer = time_peer(folder, ids, args.device, args.peer_pythonpath, work / f"{name}.peer.safetensors")
        row["peer"] = peer
        if "seconds" in peer:
            row["ratio_qf_over_peer"] = row["qf_seconds"] / peer["seconds"]
        # both in bfloat16, the dtype real checkpoints ship in (block forwards in bf16; both
        # accumulate Hessians and solve in float32)
        row["qf_seconds_bf16"] = time_qf(folder, args.device, dtype="bfloat16")
        peer16 = time_peer(folder, ids, args.device, args.peer_pythonpath, work / f"{name}.peer16.safetensors",
                           dtype="bfloat16")
        row["peer_bf16"] = peer16
        if "seconds" in peer16:
            row["ratio_qf_over_peer_bf16"] = row["qf_seconds_bf16"] / peer16["seconds"]
        results["rows"][name] = row
        print(name, json.dumps(row)[:400], flush=True)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

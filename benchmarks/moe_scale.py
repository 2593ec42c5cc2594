"""MoE and multi-process benchmark: peak host RSS and GPU memory of ``qf run`` on config-built
Mixtral models of growing depth and expert count, and the time of one process vs several.

1. Build random-initialized Mixtral checkpoints (per-expert tensors, as real ones; one
   safetensors shard per block, written one block at a time) for every (layers, experts) of the
   sweep; hidden 1024, expert FFN 2048, 16 heads / 4 KV heads, 2 experts per token.
2. ``qf run --quantizer gptq`` (calibration: ``--samples`` × ``--seq-len`` tokens of the
   embedded text, ``--expert-routing fill``) on each, under ``/usr/bin/time`` in a fresh process:
   peak RSS; on CUDA also ``torch.cuda.max_memory_allocated`` of the run (rank 0's).
3. ``--processes N``: the largest model again with ``--devices cuda:0,…`` (or the same GPU
   named N times: two processes on one GPU, a check of the bytes, not a speed-up), wall time
   and whether the artifact bytes equal the one-process run's.

    python benchmarks/moe_scale.py --device cpu --out benchmarks/results/moe_scale_cpu.json
    python benchmarks/moe_scale.py --device cuda --processes 2 --out benchmarks/results/moe_scale_cuda.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import core_version, cpu_name
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
TOKENIZER_FROM = HERE.parent / "core" / "quantfoundry" / "data" / "pycode-7m"
TOKENIZER_FILES = ["tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"]
TIME = "/usr/bin/time"
HIDDEN, FFN, HEADS, KV = 1024, 2048, 16, 4


def config(layers: int, experts: int) -> dict[str, Any]:
    return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 4096,
            "hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": layers,
            "num_attention_heads": HEADS, "num_key_value_heads": KV, "num_local_experts": experts,
            "num_experts_per_tok": 2, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "dtype": "bfloat16"}


def block_shapes(i: int, experts: int) -> dict[str, tuple[int, ...]]:
    p = f"model.layers.{i}"
    hd = HIDDEN // HEADS
    out = {f"{p}.self_attn.q_proj.weight": (HIDDEN, HIDDEN), f"{p}.self_attn.k_proj.weight": (KV * hd, HIDDEN),
           f"{p}.self_attn.v_proj.weight": (KV * hd, HIDDEN), f"{p}.self_attn.o_proj.weight": (HIDDEN, HIDDEN),
           f"{p}.input_layernorm.weight": (HIDDEN,), f"{p}.post_attention_layernorm.weight": (HIDDEN,),
           f"{p}.block_sparse_moe.gate.weight": (experts, HIDDEN)}
    for e in range(experts):
        q = f"{p}.block_sparse_moe.experts.{e}"
        out.update({f"{q}.w1.weight": (FFN, HIDDEN), f"{q}.w3.weight": (FFN, HIDDEN), f"{q}.w2.weight": (HIDDEN, FFN)})
    return out


def build(folder: Path, layers: int, experts: int, seed: int = 0) -> None:
    if (folder / "model.safetensors.index.json").is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shards = {f"layer-{i:03d}": block_shapes(i, experts) for i in range(layers)}
    shards["outside"] = {"model.embed_tokens.weight": (4096, HIDDEN), "model.norm.weight": (HIDDEN,),
                         "lm_head.weight": (4096, HIDDEN)}
    weight_map: dict[str, str] = {}
    total = 0
    for shard, shapes in shards.items():
        tensors = {n: (torch.ones(s) if n.endswith("norm.weight") else torch.randn(s, generator=gen) * 0.02
                       ).to(torch.bfloat16) for n, s in shapes.items()}
        file = f"model-{shard}.safetensors"
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        total += sum(t.nbytes for t in tensors.values())
    (folder / "config.json").write_text(json.dumps(config(layers, experts), indent=2))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    for f in TOKENIZER_FILES:
        shutil.copy(TOKENIZER_FROM / f, folder / f)


RUNNER = """
import json, sys, time, torch, quantfoundry as qf
from quantfoundry.memory import mmap_large_allocations
args = json.loads(sys.argv[1])
if __name__ == "__main__":
    mmap_large_allocations()  # as the qf command does at start
    t = time.perf_counter()
    qf.run(args.pop("model"), **args)
    wall = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    print("RESULT " + json.dumps({"run_seconds": wall, "gpu_peak_bytes": peak}))
"""


def measure(model: Path, out: Path, args: argparse.Namespace, devices: str | None = None) -> dict[str, Any]:
    run = {"model": str(model), "quantizer": "gptq", "calibrator_options": {"n_samples": args.samples,
           "seq_len": args.seq_len}, "batch_size": args.batch_size, "evaluators": [], "progress": False,
           "out": str(out), "overwrite": True, "expert_routing": "fill",
           "quantizer_options": {"stats_mb": args.stats_mb}}
    run.update({"devices": devices} if devices else {"device": args.device})
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "runner.py"
        script.write_text(RUNNER)
        report = Path(tmp) / "time"
        proc = subprocess.run([TIME, "-f", "%M %e", "-o", str(report), sys.executable, str(script), json.dumps(run)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError((proc.stdout + proc.stderr)[-3000:])
        rss_kib, wall = report.read_text().split()[-2:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    digest = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest() \
        if (out / "model.safetensors").exists() else hashlib.sha256(
            b"".join(p.read_bytes() for p in sorted(out.glob("*.safetensors")))).hexdigest()
    return {"peak_rss_bytes": int(rss_kib) * 1024, "wall_seconds": float(wall), **json.loads(line[7:]),
            "artifact_sha256": digest}


def main() -> None:
    global HIDDEN, FFN
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path.home() / ".cache/qf-bench/moe")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--depths", default="2,4,8", help="layers at --base-experts experts")
    ap.add_argument("--experts", default="4,8,16", help="experts at --base-layers layers")
    ap.add_argument("--base-experts", type=int, default=8)
    ap.add_argument("--base-layers", type=int, default=4)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--stats-mb", type=int, default=2048, help="gptq's stats_mb (a stage's Hessians)")
    ap.add_argument("--hidden", type=int, default=HIDDEN)
    ap.add_argument("--ffn", type=int, default=FFN, help="each expert's FFN width")
    ap.add_argument("--processes", type=int, default=0, help="also time the largest model on this many processes")
    ap.add_argument("--out", type=Path, default=HERE / "results/moe_scale_cpu.json")
    args = ap.parse_args()
    HIDDEN, FFN = args.hidden, args.ffn

    points = sorted({(int(d), args.base_experts) for d in args.depths.split(",")} |
                    {(args.base_layers, int(e)) for e in args.experts.split(",")})
    rows = []
    for layers, experts in points:
        folder = args.root / f"mixtral-h{HIDDEN}-f{FFN}-{layers}l-{experts}e"
        build(folder, layers, experts)
        block = sum(torch.Size(s).numel() for s in block_shapes(0, experts).values())
        with tempfile.TemporaryDirectory() as tmp:
            r = measure(folder, Path(tmp) / "a", args)
        row = {"layers": layers, "experts": experts,
               "model_bytes_bf16": sum(f.stat().st_size for f in folder.glob("*.safetensors")),
               "block_bytes_fp32": 4 * block, **r}
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("layers", "experts", "model_bytes_bf16", "block_bytes_fp32",
                                                 "peak_rss_bytes", "gpu_peak_bytes", "wall_seconds")}), flush=True)
    multi = None
    if args.processes > 1:
        layers, experts = max(points, key=lambda p: p[0] * p[1])
        folder = args.root / f"mixtral-h{HIDDEN}-f{FFN}-{layers}l-{experts}e"
        n_gpu = torch.cuda.device_count() if args.device.startswith("cuda") else 0
        if args.device.startswith("cuda"):
            devices = ",".join(f"cuda:{i if n_gpu >= args.processes else 0}" for i in range(args.processes))
        else:
            devices = ",".join(["cpu"] * args.processes)
        with tempfile.TemporaryDirectory() as tmp:
            one = measure(folder, Path(tmp) / "one", args)
            many = measure(folder, Path(tmp) / "many", args, devices=devices)
        multi = {"layers": layers, "experts": experts, "devices": devices, "one": one, "many": many,
                 "identical_bytes": one["artifact_sha256"] == many["artifact_sha256"],
                 "speedup_run": round(one["run_seconds"] / many["run_seconds"], 3),
                 "shared_gpu": args.device.startswith("cuda") and n_gpu < args.processes}
        print(json.dumps(multi), flush=True)
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else cpu_name()
    result = {"device": args.device, "device_name": device_name, "cores": os.cpu_count(),
              "shape": {"hidden": HIDDEN, "expert_ffn": FFN, "heads": HEADS, "kv_heads": KV, "experts_per_token": 2},
              "calibration": {"samples": args.samples, "seq_len": args.seq_len, "batch_size": args.batch_size},
              "gptq_stats_mb": args.stats_mb,
              "rows": rows, "processes": multi, "torch": torch.__version__, "quantfoundry": core_version(),
              "measured": time.strftime("%Y-%m-%d")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

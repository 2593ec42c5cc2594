"""Streaming-memory benchmark: peak RSS of ``qf run`` on a ~2 GB bf16 Llama.

1. Build a random-initialized LlamaForCausalLM (default: hidden 2048, FFN 5632, 22 layers,
   32 heads / 4 KV heads, vocab 4096 — TinyLlama-1.1B's shape with pycode-7m's tokenizer) and
   write it as one safetensors shard per decoder block, holding at most one block in memory.
2. Run ``qf run --quantizer rtn --format int4-g128 --no-eval`` on it under ``/usr/bin/time``
   and read its peak RSS and wall time; do the same for a trivial ``qf plugins`` (the import
   cost) and for ``qf run --dry-run`` (imports, weight checks and plan, no block loop).

    python benchmarks/peak_rss.py                 # build once into ~/.cache/qf-bench, then measure
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import core_version
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

HERE = Path(__file__).resolve().parent
TOKENIZER_FROM = HERE.parent.parent / "shared" / "models" / "pycode-7m"
TOKENIZER_FILES = ["tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"]
QF = str(Path(sys.executable).parent / "qf")  # the console script itself, not a pyenv shim
TIME = "/usr/bin/time"  # GNU time


def make_config(args: argparse.Namespace) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=4096, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, architectures=["LlamaForCausalLM"], dtype="bfloat16")


def param_groups(config: LlamaConfig) -> dict[str, dict[str, tuple[int, ...]]]:
    """Shard name → {tensor name: shape}: one shard per decoder block, one for the rest."""
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    groups: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, p in skeleton.named_parameters():
        parts = name.split(".")
        shard = f"layer-{int(parts[2]):03d}" if parts[:2] == ["model", "layers"] else "outside"
        groups.setdefault(shard, {})[name] = tuple(p.shape)
    return groups


def build_model(folder: Path, config: LlamaConfig, seed: int) -> bool:
    """Write the random model shard by shard; False (nothing done) when it already exists."""
    if (folder / "model.safetensors.index.json").is_file():
        return False
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    total = 0
    for shard, shapes in param_groups(config).items():
        tensors = {}
        for name, shape in shapes.items():
            if name.endswith("norm.weight"):
                t = torch.ones(shape, dtype=torch.bfloat16)
            else:
                t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
            tensors[name] = t
            total += t.nbytes
        file = f"model-{shard}.safetensors"
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    config.to_json_file(str(folder / "config.json"))
    for f in TOKENIZER_FILES:
        shutil.copy(TOKENIZER_FROM / f, folder / f)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return True


def measure(cmd: list[str]) -> dict[str, Any]:
    """Run ``cmd`` under GNU time: its peak RSS (``%M``, KiB) and wall/user/sys seconds.

    Not ``os.wait4`` on our own child: a child's ``ru_maxrss`` starts from this (large) Python
    process's high-water mark, which it inherits until ``exec``; ``/usr/bin/time`` is tiny.
    """
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        load = os.getloadavg()[0]
        proc = subprocess.run([TIME, "-f", "%M %e %U %S", "-o", report.name, *cmd], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
        maxrss_kib, wall, user, system = report.read().split()[-4:]
    return {"cmd": " ".join(cmd), "peak_rss_bytes": int(maxrss_kib) * 1024, "wall_seconds": float(wall),
            "user_seconds": float(user), "sys_seconds": float(system), "loadavg_1m_before": load}


def model_figures(config: LlamaConfig, folder: Path) -> dict[str, Any]:
    groups = param_groups(config)
    n = {shard: sum(torch.Size(s).numel() for s in shapes.values()) for shard, shapes in groups.items()}
    block = max(v for k, v in n.items() if k.startswith("layer-"))
    embed = torch.Size(groups["outside"]["model.embed_tokens.weight"]).numel()
    return {
        "parameters": sum(n.values()),
        "model_bytes_bf16": sum(f.stat().st_size for f in folder.glob("*.safetensors")),
        "largest_block_params": block,
        "largest_block_bytes_fp32": 4 * block,
        "embeddings_bytes_bf16": 2 * embed,
        "outside_blocks_bytes_fp32": 4 * n["outside"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", type=Path, default=Path.home() / ".cache/qf-bench/llama-1.5g")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--format", default="int4-g128")
    ap.add_argument("--repeats", type=int, default=3, help="qf run this many times; the highest peak is reported")
    ap.add_argument("--out", type=Path, default=HERE / "results/peak_rss.json")
    args = ap.parse_args()

    config = make_config(args)
    t0 = time.perf_counter()
    built = build_model(args.folder, config, args.seed)
    build = {"seconds": round(time.perf_counter() - t0, 1),
             "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024} if built else None
    print(f"model ready in {args.folder} ({time.perf_counter() - t0:.0f} s)", flush=True)
    figures = model_figures(config, args.folder)

    baseline = measure([QF, "plugins"])
    dry_run = measure([QF, "run", "--model", str(args.folder), "--format", args.format, "--dry-run"])
    runs = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="qf-peak-rss-") as tmp:
            artifact = Path(tmp) / "artifact"
            runs.append(measure([QF, "run", "--model", str(args.folder), "--quantizer", "rtn", "--format",
                                 args.format, "--no-eval", "--no-progress", "--out", str(artifact), "--overwrite"]))
            runs[-1]["artifact_bytes"] = sum(f.stat().st_size for f in artifact.rglob("*") if f.is_file())
    quant = max(runs, key=lambda r: r["peak_rss_bytes"])  # the worst run is the figure
    peak, base = quant["peak_rss_bytes"], baseline["peak_rss_bytes"]
    result = {
        "model": str(args.folder), "format": args.format,
        "config": {k: getattr(args, k) for k in ("hidden", "intermediate", "layers", "heads", "kv_heads")},
        **figures, "build_this_run": build,
        "baseline_qf_plugins": baseline, "qf_run_dry_run": dry_run, "qf_run": quant, "qf_run_all": runs,
        "peak_minus_baseline_bytes": peak - base,
        "peak_over_model_bytes": round(peak / figures["model_bytes_bf16"], 3),
        "peak_minus_baseline_over_largest_block_fp32": round((peak - base) / figures["largest_block_bytes_fp32"], 2),
        "torch": torch.__version__, "cores": os.cpu_count(), "quantfoundry": core_version(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    mb = 1 / 2**20
    print(f"model on disk {figures['model_bytes_bf16'] * mb:,.0f} MiB bf16; "
          f"largest block fp32 {figures['largest_block_bytes_fp32'] * mb:,.0f} MiB; "
          f"embeddings {figures['embeddings_bytes_bf16'] * mb:,.0f} MiB")
    print(f"qf plugins peak RSS {base * mb:,.0f} MiB; --dry-run {dry_run['peak_rss_bytes'] * mb:,.0f} MiB; "
          f"qf run peak RSS {peak * mb:,.0f} MiB "
          f"(+{(peak - base) * mb:,.0f} MiB over baseline; {result['peak_over_model_bytes']:.2f}x the model) "
          f"in {quant['wall_seconds']:.0f} s; all runs: {[round(r['peak_rss_bytes'] * mb) for r in runs]} MiB, "
          f"{[r['wall_seconds'] for r in runs]} s")


if __name__ == "__main__":
    main()

"""Crash-resume (issue 15): a GPTQ run killed with SIGKILL once ``--kill-after`` blocks are in its
journal, then ``qf run ... --resume``; the artifact is compared byte for byte with an
uninterrupted run's, and the times are recorded: the uninterrupted run, the killed run up to the
kill, the resumed run (restoring the journaled blocks, then the rest).

Every run is a ``qf run`` subprocess (``--no-eval``: quantize and export only), so process start
and model load are in every figure. ``llama-1b`` is a config-built 1B Llama (TinyLlama shapes,
random weights: only times and bytes mean anything).

    python benchmarks/resume.py --model pycode-7m --kill-after 3                 # CPU: 3 of 6 blocks
    python benchmarks/resume.py --model llama-1b --kill-after 11 --device cuda    # the H100
"""

from __future__ import annotations

import argparse
import hashlib
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def digest(folder: Path) -> dict[str, str]:
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file() and f.name != "quantfoundry.json"}


def qf_run(*args: str) -> list[str]:
    return [sys.executable, "-c", "from quantfoundry.cli import main; main()", "run", *args]


def model_folder(name: str, work: Path) -> Path:
    if name == "pycode-7m":
        from quantfoundry.data import default_model_path

        return default_model_path()
    if name == "llama-1b":
        import torch
        from gptq_speed import LLAMA_1B
        from quantfoundry.testing.tiny import build_tiny_model

        return build_tiny_model(work / "llama-1b", "llama", dtype=torch.bfloat16, vocab_size=32000, **LLAMA_1B)
    return Path(name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="pycode-7m", help="pycode-7m, llama-1b or a folder")
    ap.add_argument("--kill-after", type=int, default=3, help="blocks journaled before the SIGKILL")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quantizer", default="gptq")
    ap.add_argument("--format", default="int4-g128")
    ap.add_argument("--out", type=Path, help="results JSON (default: benchmarks/results/resume_<model>_<device>.json)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="qf-resume-"))
    folder = model_folder(args.model, work)
    common = ["--model", str(folder), "--quantizer", args.quantizer, "--format", args.format, "--no-eval",
              "--no-progress", "--device", args.device]

    t0 = time.perf_counter()
    subprocess.run(qf_run(*common, "--out", str(work / "whole")), check=True, capture_output=True)
    whole = time.perf_counter() - t0

    out = work / "killed"
    t0 = time.perf_counter()
    proc = subprocess.Popen(qf_run(*common, "--out", str(out)), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    marker = f"block-{args.kill_after - 1:05d}.safetensors"
    while proc.poll() is None:
        if any((j / marker).exists() for j in out.parent.glob(f".{out.name}.partial-*")):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    killed_at = time.perf_counter() - t0
    if proc.returncode != -signal.SIGKILL:
        raise SystemExit(f"the run ended (code {proc.returncode}) before block {args.kill_after} was journaled")
    journal = next(out.parent.glob(f".{out.name}.partial-*"))
    done = len(list(journal.glob("block-*.safetensors")))

    t0 = time.perf_counter()
    r = subprocess.run(qf_run(*common, "--out", str(out), "--resume"), capture_output=True, text=True)
    resumed = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    manifest = json.loads((out / "quantfoundry.json").read_text())
    identical = digest(out) == digest(work / "whole")
    import torch

    result = {
        "model": args.model, "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__, "quantizer": args.quantizer, "format": args.format,
        "blocks": manifest["plan"] and len({k.split(".")[2] for k in manifest["plan"] if k.startswith("model.layers.")}),
        "killed_after_blocks": done, "resumed_from_block": manifest["resumed"]["from_block"],
        "seconds_uninterrupted": round(whole, 2), "seconds_until_kill": round(killed_at, 2),
        "seconds_resumed_run": round(resumed, 2), "artifact_byte_identical": identical,
        "files": sorted(digest(out)),
    }
    path = args.out or HERE / "results" / f"resume_{args.model}_{args.device.split(':')[0]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if not identical:
        raise SystemExit("the resumed artifact differs from the uninterrupted one")


if __name__ == "__main__":
    main()

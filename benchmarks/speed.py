"""Speed evaluator figures: prefill/decode tokens/s and peak memory, quantized vs original.

Each format runs ``quantfoundry.run(model, format=spec, evaluators=[speed], out=None)``: the
``speed`` evaluator times the in-memory quantized model (the kernel the run chose:
``torch-dequant``, the reference kernel that dequantizes every weight to float32 on each call)
and then the original in float32, in the same process. Only the ratio quantized/original is
meaningful; the machine and its load are recorded.

    python benchmarks/speed.py --model pycode-7m --device cpu
    python benchmarks/speed.py --model llama-1.5g --device cuda   # builds the random 1B model first
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path
from typing import Any

import quantfoundry
import torch
from _common import core_version

HERE = Path(__file__).resolve().parent
FORMATS = ["int8", "int4-g128", "int3-g128"]


def model_folder(name: str) -> str | None:
    if name == "pycode-7m":
        return None  # the embedded default
    if name == "llama-1.5g":
        import peak_rss
        from quantfoundry.data import default_model_path

        peak_rss.TOKENIZER_FROM = default_model_path()  # the same tokenizer, wherever shared/ is
        folder = Path.home() / ".cache/qf-bench/llama-1.5g"
        args = argparse.Namespace(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4)
        peak_rss.build_model(folder, peak_rss.make_config(args), seed=0)
        return str(folder)
    return name


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="pycode-7m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    opts = {"prompt_tokens": a.prompt_tokens, "new_tokens": a.new_tokens, "repeats": a.repeats}
    rows: dict[str, Any] = {}
    for spec in FORMATS:
        r = quantfoundry.run(model_folder(a.model), format=spec, out=None, progress=False, device=a.device,
                             evaluators=[("speed", opts)], cache=False)
        rows[spec] = {k: v for k, v in r.metrics["speed"].items()}
        s = rows[spec]
        print(spec, {k: (round(s[k]["quantized"], 1), round(s[k]["original"], 1))
                     for k in ("prefill_tok_s", "decode_tok_s", "weights_mib", "peak_mib") if k in s}, flush=True)
    device = torch.cuda.get_device_name() if a.device.startswith("cuda") else platform.processor() or "cpu"
    out = a.out or HERE / "results" / f"speed_{a.model}_{a.device.split(':')[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": a.model, "device": device, "threads": torch.get_num_threads(),
                               "cpus": os.cpu_count(), "load_avg": os.getloadavg(), "options": opts,
                               "torch": torch.__version__, **core_version(), "rows": rows}, indent=1) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()

"""Does GPTQModel read qf's ``hf-gptq`` checkpoints? Export pycode-7m with ``gptq`` + ``hf-gptq``,
(``checkpoint_format`` gptq = v1, and gptq_v2), load the folder with GPTQModel (its own virtualenv, CPU, ``peers/gptqmodel_dequant.py``) and
compare its dequantized weights with the codes and scales qf wrote, dequantized the way
GPTQModel's torch kernel does (``(q − zero) · scale`` in the model's dtype, bf16 here).

    python benchmarks/gptqmodel_load.py [--gptqmodel-python /work/venvs/gptqmodel-try/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path

import quantfoundry as qf
import torch
from qf_gptq.exporter import load_gptq_checkpoint
from quantfoundry import QuantLinear

HERE = Path(__file__).resolve().parent
WORK = HERE / ".cache" / "gptqmodel"
RESULTS = HERE / "results" / "gptqmodel_load.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gptqmodel-python", default="/work/venvs/gptqmodel-try/bin/python")
    args = ap.parse_args()
    rows = {}
    for fmt, opts, ckpt in (("int4-g128-sym", {"desc_act": True}, "gptq"), ("int3-g128-sym", {}, "gptq"),
                            ("int4-g128", {}, "gptq"), ("int4-g128", {}, "gptq_v2"),
                            ("int3-g128", {"desc_act": True}, "gptq_v2")):
        label = f"{fmt}{'-act' if opts else ''}|{ckpt}"
        folder = WORK / label.replace("|", "-")
        qf.run(quantizer="gptq", quantizer_options=opts, format=fmt, exporter="hf-gptq", out=folder, overwrite=True,
               exporter_options={"checkpoint_format": ckpt}, calibrator_options={"n_samples": 8, "seq_len": 256},
               artifact_eval=False, progress=False)
        dump = folder.with_suffix(".pt")
        r = subprocess.run([args.gptqmodel_python, str(HERE / "peers" / "gptqmodel_dequant.py"), str(folder), str(dump)],
                           capture_output=True, text=True, env=dict(os.environ, GPTQMODEL_CPU_WORKERS="2"))
        if r.returncode != 0:
            rows[label] = {"loaded": False, "error": (r.stderr.strip().splitlines() or ["?"])[-1]}
            print(label, rows[label], flush=True)
            continue
        theirs = torch.load(dump)
        dtype = getattr(torch, theirs["dtype"].removeprefix("torch."))
        model = load_gptq_checkpoint(folder, device=torch.device("cpu"))
        equal = total = 0
        for name, mod in model.named_modules():
            if not isinstance(mod, QuantLinear):
                continue
            qw = mod.qweight
            codes = qw.codes().to(torch.float32)
            g = qw.format.options.group_size
            idx = torch.arange(qw.shape[1]) // g
            zero = qw.params["zero"].float() if "zero" in qw.params else torch.full_like(
                qw.params["scale"].float(), float(1 << (qw.format.options.bits - 1)))
            w = (codes.to(dtype) - zero[:, idx].to(dtype)) * qw.params["scale"].to(dtype)[:, idx]
            if qw.perm is not None:
                w = w[:, torch.argsort(qw.perm)]
            equal += int((w.float() == theirs["weights"][name]).sum())
            total += w.numel()
        rows[label] = {"loaded": True, "kernel": theirs["kernel"], "dtype": theirs["dtype"],
                       "weights_equal": equal, "weights": total, "options": opts}
        print(label, rows[label], flush=True)
    RESULTS.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

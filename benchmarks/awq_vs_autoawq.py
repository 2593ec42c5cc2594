"""Issue 18: qf's ``awq`` against AutoAWQ 0.2.9's own (``third_party_plugins/qf-autoawq``: its
scale search, clipping and grid, run through qf) on the same model, calibration set and grid —
the cross-check the issue asks of an unmaintained peer. Protocol: the core's defaults
(``python_calib.txt``, 128 × 512 tokens), ``int4-g64``, ``kl`` on 16,384 held-out tokens of
``python_eval.txt`` and of ``english_eval.txt``; time: the whole ``qf.run``.

    python benchmarks/awq_vs_autoawq.py [--models pycode-7m] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import quantfoundry as qf
from _common import kl_pair_table, parse_results_args, save_rows
from quantfoundry.data import default_eval_text, english_eval_text
from rtn_sweep import model_folder

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "awq_vs_autoawq.json"
METHODS = ("awq", "autoawq", "rtn")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["pycode-7m"])
    ap.add_argument("--format", default="int4-g64")
    ap.add_argument("--device", default="cpu")
    parsed = parse_results_args(ap, RESULTS, table)
    if parsed is None:
        return
    args, rows = parsed
    texts = {"python": default_eval_text(), "wikitext": english_eval_text()}
    for model in args.models:
        for method in METHODS:
            key = f"{model}|{args.format}|{method}"
            if key in rows:
                continue
            t0 = time.perf_counter()
            r = qf.run(str(model_folder(model)), quantizer=method, format=args.format, out=None, progress=False,
                       device=args.device, evaluators=[("kl", {"path": str(p), "max_tokens": 16384})
                                                       for p in texts.values()])
            row: dict[str, Any] = {"seconds": round(time.perf_counter() - t0, 1), "device": args.device}
            for side, path in texts.items():
                m = next(v for k, v in r.metrics.items() if k.startswith("kl[") and Path(path).name in k)
                row[side] = {k: m[k]["quantized"] for k in ("kl_mean", "same_top1_pct")}
            rows[key] = row
            save_rows(args.results, rows)
            print(key, json.dumps(row), flush=True)
    print(table(rows))


def table(rows: dict[str, Any]) -> str:
    return kl_pair_table(rows, "run s", 1)


if __name__ == "__main__":
    sys.exit(main())

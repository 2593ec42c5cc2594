"""Why int4-g32 is not lossless on the Q4_1-dequantized SmolLM2.

Q4_1 stores ``w = d·q + m`` per group of 32 with a *float* offset ``m`` (the group minimum);
the built-in ``int`` format's asymmetric grid has an *integer* zero point
(``w = (q - zero)·scale``, the GPTQ/AWQ convention), so it cannot reproduce Q4_1's grid.
This script measures, over every block linear, the relative weight error of
(a) qf's int4-g32 and (b) a float-offset Q4_1-style grid, both fitted to the stored weights.

    python benchmarks/q4_1_grid_check.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import torch
from quantfoundry import resolve_model
from quantfoundry.formats import resolve_format

BUILD = str(Path(__file__).resolve().parent.parent.parent / "shared/models/smollm2-135m-instruct-q4_1-dequant/build.sh")


def float_offset_grid(w: torch.Tensor, group: int = 32, bits: int = 4) -> torch.Tensor:
    """Q4_1-style round trip (d, m kept in float32): d = (max - min) / 15, m = min, w' = round((w - m)/d)·d + m."""
    g = w.view(w.shape[0], -1, group)
    m = g.amin(-1, keepdim=True)
    d = ((g.amax(-1, keepdim=True) - m) / (2**bits - 1)).clamp(min=1e-12)
    return (torch.round((g - m) / d) * d + m).view_as(w)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--format", default="int4-g32")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results/q4_1_grid_check.json")
    args = ap.parse_args()

    folder = subprocess.run(["bash", BUILD], check=True, capture_output=True, text=True).stdout.split()[-1]
    source = resolve_model(folder)
    fmt = resolve_format(args.format)
    err = {"qf": 0.0, "float_offset": 0.0}
    energy = 0.0
    names = [n for n in source.linear_shapes() if source.is_block_linear(n)]
    for name in names:
        w = source.read([f"{name}.weight"])[f"{name}.weight"].float()
        params = fmt.fit(w)
        err["qf"] += float(((fmt.quantize_dequantize(w, params) - w) ** 2).sum())
        err["float_offset"] += float(((float_offset_grid(w) - w) ** 2).sum())
        energy += float((w**2).sum())
    result = {"model": folder, "format": args.format, "linears": len(names),
              "relative_mse": {k: v / energy for k, v in err.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Perplexity of a Hugging Face causal LM, as is and with replaced Linear weights.

An independent sanity check for the peer runners in this folder (run it with a
peer's venv python; it needs torch, transformers and safetensors and does not
import quantfoundry). ``--ids`` is a ``torch.save``-d int64 tensor
``[n_windows, seq_len]`` (see make_calib_ids.py, ``--from-end`` for held-out
text); each window is scored on its own (no context carried over), and the
perplexity is ``exp`` of the mean next-token negative log-likelihood over all
``n_windows x (seq_len - 1)`` predicted tokens. The model is loaded in float32;
each ``--weights FILE.safetensors`` (e.g. llmc_gptq.py's output) has its tensors
copied over the same-named parameters of a fresh copy of the model.

    python ppl_check.py --model DIR --ids heldout.pt --weights a.safetensors b.safetensors
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


@torch.no_grad()
def perplexity(model: torch.nn.Module, ids: torch.Tensor, batch: int = 4) -> float:
    """exp(mean next-token NLL) over all windows, each scored independently."""
    total, count = 0.0, 0
    for i in range(0, ids.shape[0], batch):
        x = ids[i: i + batch]
        logits = model(input_ids=x).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                x[:, 1:].reshape(-1), reduction="sum")
        total += nll.item()
        count += x[:, 1:].numel()
    return math.exp(total / count)


def load_with(model_dir: Path, weights: Path | None) -> torch.nn.Module:
    """The model in float32, with ``weights``' tensors copied over its parameters."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if weights is not None:
        params = dict(model.named_parameters())
        tensors = load_file(str(weights))
        missing = sorted(set(tensors) - set(params))
        if missing:
            raise SystemExit(f"{weights}: no parameter named {missing[:3]}...")
        for name, t in tensors.items():
            if params[name].shape != t.shape:
                raise SystemExit(f"{weights}: {name} has shape {tuple(t.shape)}, "
                                 f"model has {tuple(params[name].shape)}")
            params[name].data.copy_(t)
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--ids", required=True, type=Path)
    p.add_argument("--weights", nargs="*", type=Path, default=[])
    a = p.parse_args()
    ids = torch.load(a.ids, weights_only=True).to(torch.int64)
    rows = [{"weights": None, "ppl": perplexity(load_with(a.model, None), ids)}]
    for w in a.weights:
        rows.append({"weights": str(w), "ppl": perplexity(load_with(a.model, w), ids)})
    for r in rows:
        r["ppl"] = round(r["ppl"], 4)
        print(json.dumps(r))


if __name__ == "__main__":
    main()

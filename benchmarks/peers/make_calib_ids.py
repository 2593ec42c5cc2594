"""Cut a text file into a [n_samples, seq_len] int64 tensor of token ids.

Helper for the peer runners in this folder (run it with the peer's venv python,
e.g. /work/venvs/llmc/bin/python; it needs only torch and transformers and does
not import quantfoundry). The whole file is tokenized once, without special
tokens, and consecutive non-overlapping windows of ``seq_len`` tokens are taken,
starting ``--skip`` windows into the stream, or counted from the end with
``--from-end`` (so that calibration and held-out windows never overlap:
calibrate on the first windows, evaluate on the last ones).

    python make_calib_ids.py --tokenizer MODEL_DIR --text FILE \
        --n 16 --seq-len 512 --out calib.pt
    python make_calib_ids.py --tokenizer MODEL_DIR --text FILE \
        --n 16 --seq-len 512 --from-end --out heldout.pt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoTokenizer


def windows(ids: list[int], n: int, seq_len: int, skip: int, from_end: bool) -> torch.Tensor:
    """``n`` consecutive windows of ``seq_len`` ids, ``skip`` windows in from the start (or end)."""
    total = len(ids) // seq_len
    if n + skip > total:
        raise SystemExit(f"text has {len(ids)} tokens = {total} windows of {seq_len}; "
                         f"asked for {n} after skipping {skip}")
    first = total - skip - n if from_end else skip
    t = torch.tensor(ids[: total * seq_len], dtype=torch.int64).view(total, seq_len)
    return t[first: first + n].clone()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="HF model/tokenizer folder")
    p.add_argument("--text", required=True, type=Path)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--skip", type=int, default=0, help="windows to skip first")
    p.add_argument("--from-end", action="store_true", help="count windows from the end of the text")
    p.add_argument("--out", required=True, type=Path)
    a = p.parse_args()
    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    ids = tok(a.text.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    t = windows(ids, a.n, a.seq_len, a.skip, a.from_end)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(t, a.out)
    print(f"{a.out}: {tuple(t.shape)} from {len(ids)} tokens")


if __name__ == "__main__":
    main()

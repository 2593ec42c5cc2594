"""Built-in calibrator ``text``: random token windows from a .txt or .jsonl file.

The text (a .txt file as is; a .jsonl file's ``text`` fields joined by blank lines) is
tokenized without special tokens; ``n_samples`` windows of ``seq_len`` tokens start at
offsets drawn with ``seed`` (windows may overlap, as in the GPTQ reference code). A text
shorter than ``n_samples * seq_len`` tokens is used anyway, with a warning in the run
summary that gives the token count; a text shorter than ``seq_len`` gives shorter windows;
an empty text is an error before any work.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data import default_calibration_text
from ..errors import UsageError
from ..files import read_jsonl
from ..hookspecs import hookimpl
from ..options import Options
from ..roles.calibrator import CalibrationSet, Calibrator


@dataclass(frozen=True, kw_only=True)
class TextCalibratorOptions(Options):
    path: Path | None = field(default=None, metadata={
        "help": "a .txt or .jsonl file (field 'text'); default: the embedded Python-code calibration text"})
    n_samples: int = field(default=128, metadata={"help": "number of token windows"})
    seq_len: int = field(default=512, metadata={"help": "tokens per window"})
    seed: int = field(default=0, metadata={"help": "seed of the window offsets"})
    add_bos: bool = field(default=False, metadata={"help": "start every window with the BOS token"})

    def __post_init__(self) -> None:
        if self.n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {self.n_samples}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")


def read_text(path: Path) -> str:
    """A .txt file's text, or a .jsonl file's ``text`` fields joined by blank lines."""
    if not path.is_file():
        raise UsageError(f"text file {path} does not exist; pass an existing .txt or .jsonl file")
    if path.suffix.lower() != ".jsonl":
        return path.read_text(encoding="utf-8", errors="replace")
    texts = []
    for i, obj in read_jsonl(path):
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise UsageError(f"{path}:{i} has no string field 'text'; each line needs {{\"text\": ...}}")
        texts.append(obj["text"])
    return "\n\n".join(texts)


class TextCalibrator(Calibrator):
    name = "text"
    description = "random token windows from a .txt/.jsonl file (default: embedded Python-code sample)"
    Options = TextCalibratorOptions

    options: TextCalibratorOptions

    def load(self, tokenizer: Any) -> CalibrationSet:
        o = self.options
        path = o.path or default_calibration_text()
        text = read_text(path)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt", verbose=False).input_ids[0] if text.strip() else None
        if ids is None or ids.numel() == 0:
            raise UsageError(f"calibration text {path} is empty; pass a file with text (--calibrator-opt path=...)")
        seq = o.seq_len - (1 if o.add_bos else 0)
        warnings = []
        want = o.n_samples * seq
        if ids.numel() < want:
            warnings.append(f"calibration text {path.name} has {ids.numel()} tokens, fewer than the "
                            f"{o.n_samples} x {seq} = {want} asked: windows overlap")
        if ids.numel() < seq:
            warnings.append(f"calibration text {path.name} has only {ids.numel()} tokens: using "
                            f"{o.n_samples} window(s) of {ids.numel()} tokens")
            seq = int(ids.numel())
        gen = torch.Generator().manual_seed(o.seed)
        starts = torch.randint(0, int(ids.numel()) - seq + 1, (o.n_samples,), generator=gen)
        windows = torch.stack([ids[s: s + seq] for s in starts.tolist()])
        if o.add_bos:
            bos = tokenizer.bos_token_id
            if bos is None:
                raise UsageError("add_bos=true, but the tokenizer has no BOS token; drop add_bos")
            windows = torch.cat([torch.full((o.n_samples, 1), bos, dtype=windows.dtype), windows], dim=1)
        return CalibrationSet(
            input_ids=windows, source=str(path),
            sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
            info={"text_tokens": int(ids.numel()), "n_samples": o.n_samples, "seq_len": int(windows.shape[1]),
                  "seed": o.seed, "warnings": warnings},
        )


@hookimpl
def qf_register_calibrators(register):
    register(TextCalibrator)

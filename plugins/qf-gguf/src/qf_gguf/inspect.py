"""``qf inspect FILE.gguf``: metadata, tensor types, bits per weight by tensor kind, chat template,
special tokens. Reads any GGUF (ours, llama.cpp's, the hub's); a truncated or foreign file is a
one-line error."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from quantfoundry.errors import ArtifactError

from .mixes import FILE_TYPES

_KINDS = ("token_embd", "output", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def gguf_file(path: Path) -> Path | None:
    """The GGUF file behind ``path`` (a .gguf file, or a qf gguf artifact folder)."""
    p = Path(path)
    if p.is_dir():
        p = p / "model.gguf"
    if p.is_file():
        with open(p, "rb") as f:
            if f.read(4) == b"GGUF":
                return p
    return None


def kind_of(name: str) -> str:
    if "norm" in name:
        return "norms"
    base = re.sub(r"^blk\.\d+\.", "", name).removesuffix(".weight").removesuffix(".bias")
    return base if base in _KINDS else "other"


def _short(value: Any) -> Any:
    if isinstance(value, list):
        if len(value) > 6:
            return f"[{len(value)} items: {', '.join(map(repr, value[:3]))}, ...]"
        return value
    if isinstance(value, str) and len(value) > 200:
        return value[:200].replace("\n", "\\n") + f"... ({len(value)} characters)"
    return value


def inspect_gguf(path: Path) -> dict[str, Any]:
    from gguf import GGMLQuantizationType, GGUFReader

    file = gguf_file(path)
    if file is None:
        raise ArtifactError(f"{path} is not a GGUF file (no GGUF magic)")
    try:
        reader = GGUFReader(str(file))
        metadata = {}
        for key, f in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            metadata[key] = _short(f.contents())
        tensors = [(t.name, GGMLQuantizationType(t.tensor_type).name, tuple(int(x) for x in t.shape),
                    int(t.n_elements), int(t.n_bytes)) for t in reader.tensors]
    except ArtifactError:
        raise
    except Exception as exc:  # truncated or corrupt: one line, never a traceback from the parser
        raise ArtifactError(f"{file} is not a readable GGUF file ({type(exc).__name__}: {exc}); "
                            "it may be truncated: download or export it again") from None
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if end > file.stat().st_size:
        raise ArtifactError(f"{file} is truncated: its tensors need {end:,} bytes, the file has "
                            f"{file.stat().st_size:,}")
    kinds: dict[str, dict[str, Any]] = {}
    for name, typ, _, n, nbytes in tensors:
        k = kinds.setdefault(kind_of(name), {"tensors": 0, "weights": 0, "bytes": 0, "types": {}})
        k["tensors"] += 1
        k["weights"] += n
        k["bytes"] += nbytes
        k["types"][typ] = k["types"].get(typ, 0) + 1
    for k in kinds.values():
        k["bpw"] = 8 * k["bytes"] / max(k["weights"], 1)
    n_all, b_all = sum(t[3] for t in tensors), sum(t[4] for t in tensors)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = tokens.contents() if tokens is not None else []
    special = {}
    for role in ("bos", "eos", "unknown", "padding", "eot"):
        f = reader.fields.get(f"tokenizer.ggml.{role}_token_id")
        if f is not None:
            i = int(f.contents())
            special[role] = f"{i} {vocab[i]!r}" if i < len(vocab) else str(i)
    template = metadata.get("tokenizer.chat_template")
    summary = {
        "file": str(file), "bytes": file.stat().st_size, "architecture": metadata.get("general.architecture"),
        "name": metadata.get("general.name"), "file type": file_type_name(metadata.get("general.file_type")),
        "tensors": len(tensors), "weights": n_all, "bits per weight (all tensors)": 8 * b_all / max(n_all, 1),
        "vocabulary": len(vocab), "special tokens": ", ".join(f"{k}={v}" for k, v in special.items()) or "none",
        "chat template": "none" if template is None else "present",
    }
    order = {k: i for i, k in enumerate((*_KINDS, "norms", "other"))}
    return {"summary": summary, "metadata": metadata,
            "kinds": dict(sorted(kinds.items(), key=lambda kv: order.get(kv[0], 99))),
            "tensors": [(n, t, "x".join(map(str, s)), f"{b:,}") for n, t, s, _, b in tensors],
            "bpw": 8 * b_all / max(n_all, 1), "n_bytes": b_all, "n_weights": n_all}



def file_type_name(code: object) -> object:
    """llama.cpp's name of ``general.file_type`` (``15`` → ``Q4_K_M``); unknown codes as they are."""
    names = {number: name for name, (_typ, number) in FILE_TYPES.items()} | {0: "F32", 1: "F16", 32: "BF16"}
    return f"{names[code]} ({code})" if isinstance(code, int) and code in names else code

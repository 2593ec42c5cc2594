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
    return {"summary": summary, "metadata": metadata, "warnings": chat_warnings(reader, vocab),
            "kinds": dict(sorted(kinds.items(), key=lambda kv: order.get(kv[0], 99))),
            "tensors": [(n, t, "x".join(map(str, s)), f"{b:,}") for n, t, s, _, b in tensors],
            "bpw": 8 * b_all / max(n_all, 1), "n_bytes": b_all, "n_weights": n_all}



def file_type_name(code: object) -> object:
    """llama.cpp's name of ``general.file_type`` (``15`` → ``Q4_K_M``); unknown codes as they are."""
    names = {number: name for name, (_typ, number) in FILE_TYPES.items()} | {0: "F32", 1: "F16", 32: "BF16"}
    return f"{names[code]} ({code})" if isinstance(code, int) and code in names else code


#: token types of ``tokenizer.ggml.token_type`` that are special (control and user-defined tokens)
_SPECIAL_TYPES = (3, 4)
_END_WORDS = re.compile(r"end|eot|eos|stop", re.I)


def chat_warnings(reader: Any, vocab: list[str]) -> list[str]:
    """What makes chat with this GGUF ramble or fail silently: no chat template, an EOS outside
    the vocabulary, a token that ends turns in the template but on which llama.cpp does not stop."""
    from .modelfile import LLAMA_CPP_EOG

    out = []
    field = reader.fields.get("tokenizer.chat_template")
    template = field.contents() if field is not None else None
    if not template:
        out.append("no chat template: Ollama and llama.cpp's chat mode cannot format a conversation "
                   "(export with --exporter-opt chat_template=FILE)")
    ids = {}
    for role in ("eos", "eot", "eom"):
        f = reader.fields.get(f"tokenizer.ggml.{role}_token_id")
        if f is not None:
            ids[role] = int(f.contents())
    if "eos" not in ids:
        out.append("no EOS token id (tokenizer.ggml.eos_token_id): generation never stops at an end token")
    elif ids["eos"] >= len(vocab):
        out.append(f"the EOS token id {ids['eos']} is outside the vocabulary ({len(vocab):,} tokens): generation "
                   "never stops at it")
    types_field = reader.fields.get("tokenizer.ggml.token_type")
    if template and types_field is not None:
        types = types_field.contents()
        stops = {vocab[i] for i in ids.values() if i < len(vocab)} | set(LLAMA_CPP_EOG)
        for i, (text, typ) in enumerate(zip(vocab, types, strict=False)):
            if typ in _SPECIAL_TYPES and text in template and _END_WORDS.search(text) and text not in stops:
                out.append(f"token {i} {text!r} ends turns in the chat template but is no end-of-generation token: "
                           f"llama.cpp and Ollama will not stop on it (add PARAMETER stop {text!r} to the Modelfile, "
                           "or make it the EOS/EOT token)")
    return out

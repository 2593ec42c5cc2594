"""Tokenizer metadata for GGUF, as llama.cpp's converter writes it (``docs/gguf-export-reference.md`` §3).

Two paths: a SentencePiece ``tokenizer.model`` (``tokenizer.ggml.model = "llama"``: pieces,
scores, token types, padded to the config's vocabulary size with ``[PAD{i}]``), or a byte-level
BPE ``tokenizer.json`` (``"gpt2"``: tokens, types, merges, and the pre-tokenizer identified by
the fingerprint of its encoding of a fixed text). The converter's qwen2moe, qwen3moe and olmoe
classes know only the second (a folder's ``tokenizer.model`` is ignored there). Special token
ids, ``add_*`` flags and the chat template come from ``gguf.SpecialVocab``.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from quantfoundry.errors import UsageError

from .pretokenizers import CHECK_TEXT, PRE_TOKENIZERS

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_SPECIAL = re.compile(r"^(<pad>|<mask>|<2mass>|\[@BOS@\]|<\|.*\|>|<｜.*｜>|<unused.*>)$")


def looks_special(token: str) -> bool:
    return bool(_SPECIAL.match(token))


#: GGUF archs whose converter class writes only a byte-level BPE vocabulary (``_set_vocab_gpt2``)
BPE_ONLY = ("qwen2moe", "qwen3moe", "olmoe")


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def add_vocab(w: Any, folder: Path, vocab_size: int, *, chat_template: Path | None = None,
              arch: str = "llama") -> list[str]:
    """Write the tokenizer keys of the model in ``folder`` as the converter does for ``arch``
    (llama, qwen2, qwen3, gemma, gemma2, gemma3, qwen2moe, qwen3moe, olmoe); returns warnings for
    the run summary."""
    import gguf

    config = _json(folder / "tokenizer_config.json")
    if arch == "llama" and config.get("add_prefix_space") is not None:
        w.add_add_space_prefix(bool(config["add_prefix_space"]))
    if _sentencepiece_path(folder, arch):
        _sentencepiece(w, folder, vocab_size, config)
        special = gguf.SpecialVocab(folder, n_vocab=vocab_size)
    elif (folder / "tokenizer.json").is_file():
        _bpe(w, folder, vocab_size)
        special = gguf.SpecialVocab(folder, load_merges=True)
        if _byte_level_post_processor(folder):  # llama.cpp's converter defaults both flags to False here
            special.add_special_token.setdefault("bos", False)
            special.add_special_token.setdefault("eos", False)
    else:
        raise UsageError(_no_vocabulary(folder, arch))
    if arch == "llama" and vocab_size == 49152:  # llama.cpp's converter: SmolLM vocabularies never add BOS
        special.add_special_token["bos"] = False
    special.add_to_gguf(w)
    spm = (folder / "tokenizer.model").is_file()
    if arch == "gemma":  # CodeGemma's ids, written for every Gemma by the converter (only eot has a key)
        extra = gguf.SpecialVocab(folder, load_merges=False,
                                  special_token_types=["prefix", "suffix", "middle", "fsep", "eot"])
        for typ, i in (("prefix", 67), ("suffix", 69), ("middle", 68), ("fsep", 70), ("eot", 107)):
            extra._set_special_token(typ, i)
        extra.chat_template = None
        extra.add_to_gguf(w)
    if arch in ("gemma", "gemma2") or (arch == "gemma3" and spm):
        w.add_add_space_prefix(False)
    warnings = []
    if chat_template is not None:
        w.add_chat_template(Path(chat_template).read_text(encoding="utf-8"))
    elif not special.chat_template:
        warnings.append("no chat template in the tokenizer files: pass --exporter-opt chat_template=FILE "
                        "for chat use in llama.cpp/Ollama")
    return warnings


def check_vocab(folder: Path, arch: str) -> None:
    """Raise :class:`UsageError` now, before any work, when :func:`add_vocab` would refuse the
    tokenizer of ``folder`` (none; a BPE pre-tokenizer llama.cpp does not know)."""
    if _sentencepiece_path(folder, arch):
        return
    if not (folder / "tokenizer.json").is_file():
        raise UsageError(_no_vocabulary(folder, arch))
    from transformers import AutoTokenizer

    pre_tokenizer(AutoTokenizer.from_pretrained(str(folder)))


def _sentencepiece_path(folder: Path, arch: str) -> bool:
    return (folder / "tokenizer.model").is_file() and arch not in BPE_ONLY


def _no_vocabulary(folder: Path, arch: str) -> str:
    if arch in BPE_ONLY:
        return (f"{folder} has no tokenizer.json; llama.cpp's converter writes {arch} vocabularies only from a "
                "byte-level BPE tokenizer.json")
    return f"{folder} has neither tokenizer.model nor tokenizer.json; the GGUF needs a vocabulary"


def _sentencepiece(w: Any, folder: Path, vocab_size: int, config: dict[str, Any]) -> None:
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(folder / "tokenizer.model"))
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [UNUSED] * vocab_size
    for i in range(min(sp.vocab_size(), vocab_size)):
        t = NORMAL
        if sp.IsUnknown(i):
            t = UNKNOWN
        elif sp.IsControl(i):
            t = CONTROL
        elif sp.IsUnused(i):
            t = UNUSED
        elif sp.IsByte(i):
            t = BYTE
        tokens[i] = sp.IdToPiece(i).encode("utf-8")
        scores[i] = sp.GetScore(i)
        types[i] = t
    for content, i in _json(folder / "added_tokens.json").items():
        if i < vocab_size:
            tokens[i], scores[i], types[i] = content.encode("utf-8"), -1000.0, USER_DEFINED
    for key, d in (config.get("added_tokens_decoder") or {}).items():
        i = int(key)
        if i >= vocab_size:
            continue
        tok = d["content"]
        if d.get("special") or looks_special(tok):
            types[i] = CONTROL
        else:
            tok = tok.replace("\u2581", " ")
            types[i] = USER_DEFINED
        scores[i], tokens[i] = -1000.0, tok.encode("utf-8")
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)


def pre_tokenizer(tokenizer: Any) -> str:
    """llama.cpp's name for this BPE tokenizer's pre-tokenizer (by the fingerprint of its encoding)."""
    fingerprint = hashlib.sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    if fingerprint not in PRE_TOKENIZERS:
        raise UsageError(f"llama.cpp does not know this BPE pre-tokenizer (fingerprint {fingerprint[:16]}); "
                         "GGUF export needs one of the tokenizers llama.cpp supports")
    return PRE_TOKENIZERS[fingerprint]


def _bpe(w: Any, folder: Path, vocab_size: int) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    pre = pre_tokenizer(tok)
    reverse = {i: s for s, i in tok.get_vocab().items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        s = reverse[i]
        if s in added:
            if not decoder[i].normalized:
                s = tok.decode(tok.encode(s, add_special_tokens=False))
            if decoder[i].special or looks_special(s):
                types.append(CONTROL)
            else:
                s = s.replace("\u2581", " ")
                types.append(USER_DEFINED)
        else:
            types.append(NORMAL)
        tokens.append(s)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)


def _byte_level_post_processor(folder: Path) -> bool:
    post = (_json(folder / "tokenizer.json").get("post_processor") or {})
    items = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    return any(p.get("type") == "ByteLevel" for p in items)

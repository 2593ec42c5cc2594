"""llama.cpp's file types (``Q4_K_M`` …): the GGML type of every tensor, by ``llama-quantize``'s
rules (``src/llama-quant.cpp``; ``docs/llama-cpp-reference.md`` §4).

:func:`choose_types` takes the GGUF tensor names and shapes of a model and returns, per tensor,
the type llama.cpp would write: ``None`` for tensors it never quantizes (1-D tensors as ggml
counts dimensions, norms, a mixture of experts' router ``ffn_gate_inp``), otherwise a GGML type
name. The rules covered: the default type per file type, the Q6_K/Q8_0 output (and tied
embedding), the attn_v / ffn_down / attn_output bumps with their layer counters and
``use_more_bits``, GQA conditions, the imatrix-only Q4_0 rule, ``--tensor-type REGEX=TYPE``
overrides (first match wins, substring search), ``pure``, and the fallback when a row is not a
whole number of blocks.

Mixtures of experts (``MixContext.n_expert`` > 1, llama.cpp's ``expert_count``): a stacked
expert tensor (``blk.N.ffn_down_exps.weight``, GGUF shape ``(in, out, n_expert)``) takes one type
by the same category rules as a dense one (``ffn_*_exps`` and ``ffn_*_shexp`` are ffn_gate /
ffn_up / ffn_down by substring), except that the ffn_down rules read the layer from the name
instead of counting tensors; with exactly 8 experts attn_v and attn_k become Q8_0 and
attn_output Q5_K for Q2_K … Q4_K_M. A shared expert's gate ``ffn_gate_inp_shexp`` (shape
``(n_embd, 1)``) is 1-D to ggml, so it stays as it is, like the router.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# file type → (default GGML type, general.file_type value as llama.cpp's LLAMA_FTYPE_MOSTLY_*)
FILE_TYPES: dict[str, tuple[str, int]] = {
    "Q4_0": ("Q4_0", 2), "Q8_0": ("Q8_0", 7), "Q2_K": ("Q2_K", 10), "Q3_K_S": ("Q3_K", 11),
    "Q3_K_M": ("Q3_K", 12), "Q3_K_L": ("Q3_K", 13), "Q4_K_S": ("Q4_K", 14), "Q4_K_M": ("Q4_K", 15),
    "Q5_K_S": ("Q5_K", 16), "Q5_K_M": ("Q5_K", 17), "Q6_K": ("Q6_K", 18),
    "Q4_1": ("Q4_1", 3), "Q5_0": ("Q5_0", 8), "Q5_1": ("Q5_1", 9),
}
BLOCK = {"Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32,
         "Q2_K": 256, "Q3_K": 256, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256, "F16": 1, "BF16": 1, "F32": 1}
_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
_NEVER = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
          "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "attn_rel_b.weight", ".position_embd",
          "position_embd.weight", "token_types.weight")


@dataclass
class MixContext:
    """Model facts the rules read (``llama_hparams``)."""

    n_layer: int
    n_head: int
    n_head_kv: int
    n_expert: int = 0  # experts per MoE layer (llama.cpp's expert_count), 0 for a dense model
    has_imatrix: bool = False
    is_70b: bool = False
    overrides: list[tuple[str, str]] = field(default_factory=list)  # --tensor-type REGEX=TYPE, in order
    pure: bool = False


def quantizable(name: str, n_dims: int) -> bool:
    """``tensor_allows_quantization`` for the architectures qf exports (``n_dims`` as
    :func:`ggml_n_dims` counts them)."""
    return n_dims >= 2 and name.endswith("weight") and not any(s in name for s in _NEVER)


def ggml_n_dims(shape: tuple[int, ...]) -> int:
    """ggml's dimension count of a GGUF shape: trailing sizes of 1 do not count (``(256, 1)`` is 1-D)."""
    n = len(shape)
    while n > 1 and shape[n - 1] == 1:
        n -= 1
    return max(n, 1)


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"), ("attn_v.weight", "attn_v"),
                     ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                     ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


def use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def fallback(ggml_type: str, ncols: int) -> str:
    """The type llama.cpp substitutes when ``ncols`` is not a whole number of blocks."""
    if ncols % BLOCK[ggml_type] == 0:
        return ggml_type
    sub = _FALLBACK.get(ggml_type, ggml_type)
    return sub if ncols % BLOCK[sub] == 0 else "F16"


def _layer_order(names: list[str]) -> list[str]:
    """llama.cpp's ``weights_map`` order: non-block tensors first, then by layer, then by name."""
    def key(n: str) -> tuple[int, str]:
        m = re.match(r"blk\.(\d+)\.", n)
        return (int(m.group(1)) if m else -1, n)
    return sorted(names, key=key)


def choose_types(file_type: str, tensors: dict[str, tuple[int, ...]], ctx: MixContext) -> dict[str, str | None]:
    """GGML type per GGUF tensor name (``None``: kept as it is). ``tensors`` maps names to GGUF
    shapes ``(ne0, ne1, ...)`` (``ne0`` = the row length, a linear's input width)."""
    if file_type not in FILE_TYPES:
        raise ValueError(f"unknown file type {file_type!r}; choose one of {', '.join(FILE_TYPES)}")
    default = FILE_TYPES[file_type][0]
    names = _layer_order(list(tensors))
    tied = "output.weight" not in tensors
    n_attention_wv = sum(1 for n in names if _category(n) == "attn_v")
    i_wv = i_down = 0
    out: dict[str, str | None] = {}
    for name in names:
        shape = tensors[name]
        if not quantizable(name, ggml_n_dims(shape)):
            out[name] = None
            continue
        new = default
        manual = False
        for pattern, typ in ctx.overrides:
            if re.search(pattern.lower(), name):
                new, manual = typ.upper(), True
                break
        if not manual and not ctx.pure:
            cat = _category(name)
            if cat == "output" or (cat == "token_embd" and tied):
                new = "Q8_0" if shape[0] % BLOCK[default] else (new if new == "Q8_0" else "Q6_K")
            elif cat == "attn_v":
                new = _attn_v(file_type, new, i_wv, n_attention_wv, ctx)
                i_wv += 1
            elif cat == "ffn_down":
                i = i_down if ctx.n_expert <= 1 else int(re.match(r"blk\.(\d+)\.", name).group(1))
                new = _ffn_down(file_type, new, i, ctx.n_layer, ctx)
                i_down += 1
            elif cat == "attn_output":
                new = _attn_output(file_type, new, ctx)
            elif cat == "attn_k" and ctx.n_expert == 8:
                new = "Q8_0"
        out[name] = fallback(new, shape[0])
    return out


def _attn_v(ft: str, new: str, i: int, n: int, ctx: MixContext) -> str:
    n_gqa = ctx.n_head // ctx.n_head_kv if ctx.n_head_kv else 0
    if ft == "Q2_K":
        new = "Q4_K" if n_gqa >= 4 else "Q3_K"
    elif ft == "Q3_K_M":
        new = "Q5_K" if i < 2 else "Q4_K"
    elif ft == "Q3_K_L":
        new = "Q5_K"
    elif ft in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
        new = "Q6_K"
    elif ft == "Q4_K_S" and i < 4:
        new = "Q5_K"
    if ctx.is_70b and new in ("Q3_K", "Q4_K"):
        new = "Q5_K"
    if ctx.n_expert == 8:
        new = "Q8_0"
    return new


def _ffn_down(ft: str, new: str, i: int, n: int, ctx: MixContext) -> str:
    if ft == "Q2_K":
        return "Q3_K"
    if ft == "Q3_K_M":
        return "Q5_K" if i < n // 16 else "Q4_K"  # the Falcon branch does not apply to qf's architectures
    if ft == "Q3_K_L":
        return "Q5_K"
    if ft in ("Q4_K_M", "Q5_K_M"):
        return "Q6_K" if use_more_bits(i, n) else new
    if ft == "Q4_K_S":
        return "Q5_K" if i < n // 8 else new
    if ft in ("Q4_0", "Q5_0") and ctx.has_imatrix and i < n // 8:
        return "Q4_1" if ft == "Q4_0" else "Q5_1"
    return new


def _attn_output(ft: str, new: str, ctx: MixContext) -> str:
    if ctx.n_expert == 8:
        return "Q5_K" if ft in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M") else new
    return {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(ft, new)

"""Architecture: the map of a model family's decoder blocks and linears.

One map serves every method: the pipeline walks ``layers``; GPTQ reads ``order`` (true
sequential); AWQ and SmoothQuant read each :class:`InputGroup`'s ``prev`` to fold scales into
the norm or linear that produces the group's input; QuIP#-style rotations read the same.
Names are relative to a decoder block (``self_attn.q_proj``) or to the model (``lm_head``);
a name may be an ``fnmatch`` pattern (``mlp.experts.*.gate_proj``) for MoE blocks.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Literal


@dataclass(frozen=True)
class InputGroup:
    """Linears that read the same input tensor, and what produces that input.

    :param linears: block-relative names (or patterns) of the linears sharing the input.
    :param prev: block-relative name of the module whose output is that input: the norm just
        before them, or the linear whose output feeds them (``v_proj`` → ``o_proj``,
        ``up_proj`` → ``down_proj``); ``None`` if nothing can absorb a per-channel scale.
    :param prev_kind: ``"norm"`` (an elementwise-affine RMSNorm/LayerNorm), ``"linear"`` or
        ``"none"``.
    :param fold_note: a caveat transform quantizers must respect (e.g. GQA head sharing for
        ``v_proj`` → ``o_proj``: the scale must be equal across query heads sharing a KV head).
    :param readers: modules kept in float that read the same input (a MoE layer's router, a
        shared expert's gate): a scale folded out of the input multiplies their weight columns
        too, so what they compute is unchanged.

    A ``prev`` with a ``*`` (``mlp.experts.*.up_proj``) stands for one group per match, the
    ``*`` of its linears bound to the same value (each expert's ``down_proj`` reads its own
    ``up_proj``).
    """

    linears: tuple[str, ...]
    prev: str | None
    prev_kind: Literal["norm", "linear", "none"] = "norm"
    fold_note: str = ""
    readers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.linears:
            raise ValueError("an InputGroup needs at least one linear")
        if (self.prev is None) != (self.prev_kind == "none"):
            raise ValueError("prev and prev_kind disagree: use prev=None with prev_kind='none'")


@dataclass(frozen=True)
class Architecture:
    """The map of one model family, keyed by the Hugging Face class names it covers.

    :param name: registry name (``llama``).
    :param hf_architectures: ``config.json`` ``architectures[0]`` values it covers.
    :param groups: the block's input groups in execution order; their union is every linear
        of the block that can be quantized.
    :param layers: dotted path of the ``ModuleList`` of decoder blocks.
    :param embeddings: dotted paths of the token embedding(s).
    :param final_norm: dotted path of the final norm.
    :param lm_head: dotted path of the output projection (tied or not).
    :param norm_weight_offset: the norm computes ``x * (offset + weight)``: 0 for Llama-style
        RMSNorm, 1 for Gemma's (``1 + weight``) — folding a scale ``s`` into it means
        ``weight' = (offset + weight) / s - offset``.
    :param attention: block-relative path of the attention module, whose keys and values the KV
        cache holds (its KV-cache scales are ``<block>.<attention>.k_scale`` / ``v_scale``).
    :param expert_linears: a mixture of experts' linears as the checkpoint names them (gate,
        up, down: ``gate_proj``/``up_proj``/``down_proj``, Mixtral's ``w1``/``w3``/``w2``); the
        skeleton splits transformers' fused experts into them.
    :param module_aliases: ``(stored, attribute)`` pairs: a block's module the model calls
        ``attribute`` is stored in the checkpoint as ``stored`` (Mixtral: ``block_sparse_moe``
        for ``mlp``); the skeleton holds it under the stored name.
    """

    name: str
    hf_architectures: tuple[str, ...]
    groups: tuple[InputGroup, ...]
    description: str = ""
    layers: str = "model.layers"
    embeddings: tuple[str, ...] = ("model.embed_tokens",)
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    norm_weight_offset: float = 0.0
    attention: str = "self_attn"
    expert_linears: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    module_aliases: tuple[tuple[str, str], ...] = ()

    @property
    def linears(self) -> tuple[str, ...]:
        """Every quantizable linear (name or pattern) of a block, in execution order."""
        return tuple(name for g in self.groups for name in g.linears)

    @property
    def order(self) -> tuple[tuple[str, ...], ...]:
        """True-sequential order: groups of linears that may be quantized together."""
        return tuple(g.linears for g in self.groups)

    def group_of(self, linear: str) -> InputGroup:
        for g in self.groups:
            if any(fnmatch.fnmatchcase(linear, pat) for pat in g.linears):
                return g
        raise KeyError(f"{linear!r} is not a linear of architecture {self.name!r}")

    def match(self, pattern: str, names: Iterable[str]) -> list[str]:
        """The names of a real block that a map entry matches (itself, or a pattern's hits)."""
        return [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def concrete_groups(group: InputGroup, modules: list[str]) -> list[InputGroup]:
    """``group``, or one group per module its ``prev`` pattern matches, with the ``*`` of its
    linears and readers bound to the matched value."""
    if group.prev is None or "*" not in group.prev:
        return [group]
    head, _, tail = group.prev.partition("*")
    out = []
    for name in modules:
        if fnmatch.fnmatchcase(name, group.prev) and name.startswith(head) and name.endswith(tail):
            bound = name[len(head):len(name) - len(tail)]
            out.append(replace(group, linears=tuple(p.replace("*", bound) for p in group.linears), prev=name,
                               readers=tuple(p.replace("*", bound) for p in group.readers)))
    return out

"""How llama.cpp's converter (``convert_hf_to_gguf.py``) names and lays out each architecture
the ``gguf`` exporter writes (``docs/gguf-export-reference.md`` §2): the GGUF arch, tensor names,
the llama q/k row permutation, and a mixture of experts' stacked tensors.

A mixture of experts' checkpoint holds one linear per expert (``...experts.3.gate_proj.weight``,
Mixtral's ``block_sparse_moe.experts.3.w1.weight``); the converter stacks each layer's experts
into ``blk.N.ffn_gate_exps``/``ffn_up_exps``/``ffn_down_exps`` (GGUF shape ``(in, out, E)``),
names the router ``ffn_gate_inp`` and Qwen2-MoE's shared expert ``ffn_*_shexp`` with its gate
``ffn_gate_inp_shexp``. :func:`gguf_name` maps every expert's linear to its stacked tensor and
:func:`expert_index` gives its slice; ``qf plan`` sizes transformers' fused experts
(``mlp.experts.gate_up_proj``) through the same names (:func:`fused_experts`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from quantfoundry.errors import UsageError

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_LLAMA_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "self_attn.o_proj.bias": "attn_output.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_QK_NORMS = {"self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight"}
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}
_GEMMA2_NORMS = {"post_attention_layernorm.weight": "post_attention_norm.weight",
                 "pre_feedforward_layernorm.weight": "ffn_norm.weight",
                 "post_feedforward_layernorm.weight": "post_ffw_norm.weight"}


@dataclass(frozen=True)
class MoESpec:
    """How llama.cpp's converter writes one architecture's mixture of experts: each layer's
    experts stacked into ``ffn_gate_exps``/``ffn_up_exps``/``ffn_down_exps`` (GGUF shape
    ``(in, out, n_expert)``, expert 0's rows first), the router as ``ffn_gate_inp``."""

    module: str = "mlp"                                      # the block's MoE module in the checkpoint
    linears: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # each expert's gate, up, down
    norm_topk: bool = False          # llama.cpp's graph renormalizes the top-k routing weights
    expert_ff_keys: bool = False     # qwen2moe/qwen3moe: expert_(shared_)feed_forward_length


@dataclass(frozen=True)
class ArchSpec:
    """How llama.cpp's converter writes one HF architecture (gguf-export-reference.md §2)."""

    gguf: str
    permute_qk: bool = False         # llama: rotate-half → interleaved rope rows
    qk_norms: bool = False           # qwen3, gemma3, qwen3moe, olmoe: q/k RMSNorm weights
    llama_keys: bool = False         # llama only: <arch>.vocab_size and rope.dimension_count
    gemma: str = ""                  # gemma / gemma2 / gemma3: norms +1, their own keys and names
    moe: MoESpec | None = None       # a mixture of experts


SUPPORTED: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec("llama", permute_qk=True, llama_keys=True),
    "MistralForCausalLM": ArchSpec("llama", permute_qk=True, llama_keys=True),
    "Qwen2ForCausalLM": ArchSpec("qwen2"),
    "Qwen3ForCausalLM": ArchSpec("qwen3", qk_norms=True),
    "GemmaForCausalLM": ArchSpec("gemma", gemma="gemma"),
    "Gemma2ForCausalLM": ArchSpec("gemma2", gemma="gemma2"),
    "Gemma3ForCausalLM": ArchSpec("gemma3", qk_norms=True, gemma="gemma3"),
    # llama.cpp's converter writes Mixtral with its llama model class: arch llama, permuted q/k
    "MixtralForCausalLM": ArchSpec("llama", permute_qk=True, llama_keys=True,
                                   moe=MoESpec("block_sparse_moe", ("w1", "w3", "w2"), norm_topk=True)),
    "Qwen2MoeForCausalLM": ArchSpec("qwen2moe", moe=MoESpec(expert_ff_keys=True)),
    "Qwen3MoeForCausalLM": ArchSpec("qwen3moe", qk_norms=True, moe=MoESpec(norm_topk=True, expert_ff_keys=True)),
    "OlmoeForCausalLM": ArchSpec("olmoe", qk_norms=True, moe=MoESpec()),
}


#: a MoE layer's tensors under its module (``mlp.``, Mixtral's ``block_sparse_moe.``) → llama.cpp's names
_MOE_NAMES = {"gate.weight": "ffn_gate_inp.weight", "router.weight": "ffn_gate_inp.weight",
              "shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
              **{f"{shared}.{p}_proj.weight": f"ffn_{p}_shexp.weight"
                 for shared in ("shared_expert", "shared_experts") for p in ("gate", "up", "down")}}
_EXPERT = re.compile(r"^experts\.(\d+)\.([^.]+)\.weight$")
_EXPS = ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight")
#: transformers' fused experts (``[E, rows, cols]`` parameters, what ``qf plan`` sizes) → the
#: stacked GGUF tensors each one holds, split along the rows
_FUSED = {"experts.gate_up_proj": _EXPS[:2], "experts.gate_proj": _EXPS[:1], "experts.up_proj": _EXPS[1:2],
          "experts.down_proj": _EXPS[2:]}


def _moe_part(rel: str, spec: ArchSpec | None) -> str | None:
    """``rel`` (block-relative) without its MoE module prefix: the checkpoint's (Mixtral's
    ``block_sparse_moe``) or transformers' ``mlp``; ``None`` outside one."""
    module = spec.moe.module if spec is not None and spec.moe is not None else "mlp"
    for prefix in (f"{module}.", "mlp."):
        if rel.startswith(prefix):
            return rel[len(prefix):]
    return None


def gguf_name(hf_name: str, spec: ArchSpec | None = None) -> str | None:
    """The GGUF tensor name of a checkpoint tensor (``None``: not written). Every expert's
    linear maps to its stacked tensor (``blk.N.ffn_gate_exps.weight``; :func:`expert_index`
    says which slice)."""
    if hf_name in _TOP:
        if hf_name == "lm_head.weight" and spec is not None and spec.gemma in ("gemma", "gemma2"):
            return None  # llama.cpp's gemma/gemma2 always read the token embedding as the output
        return _TOP[hf_name]
    m = _LAYER.match(hf_name)
    if m is None:
        return None
    sub = _moe_part(m.group(2), spec)
    if sub is not None:
        if sub in _MOE_NAMES:
            return f"blk.{m.group(1)}.{_MOE_NAMES[sub]}"
        linears = spec.moe.linears if spec is not None and spec.moe is not None else MoESpec().linears
        e = _EXPERT.match(sub)
        if e is not None and e.group(2) in linears:
            return f"blk.{m.group(1)}.{_EXPS[linears.index(e.group(2))]}"
    names = {**_LLAMA_NAMES, **(_QK_NORMS if spec is not None and spec.qk_norms else {}),
             **(_GEMMA2_NORMS if spec is not None and spec.gemma in ("gemma2", "gemma3") else {})}
    return f"blk.{m.group(1)}.{names[m.group(2)]}" if m.group(2) in names else None


def expert_index(hf_name: str) -> int | None:
    """The expert an expert linear's weight belongs to (``...experts.3.w1.weight`` → 3)."""
    m = re.search(r"\.experts\.(\d+)\.[^.]+\.weight$", hf_name)
    return int(m.group(1)) if m else None


def fused_experts(hf_name: str, spec: ArchSpec | None) -> tuple[str, ...]:
    """The stacked GGUF tensors a fused experts parameter of transformers holds (sizing only)."""
    m = _LAYER.match(hf_name)
    if m is None:
        return ()
    return tuple(f"blk.{m.group(1)}.{g}" for g in _FUSED.get(_moe_part(m.group(2), spec) or "", ()))


def expert_count(cfg: Any) -> int:
    """Experts per MoE layer, as the converter finds them (``num_local_experts``, ``num_experts``)."""
    return int(getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
               or getattr(cfg, "n_routed_experts", None) or 0)


def check_moe(hf_class: str, spec: ArchSpec, cfg: Any, names: dict[str, str], experts: dict[str, int]) -> None:
    """Refuse, before any work, a mixture of experts that llama.cpp would not load or would
    compute differently: its graphs have experts in every layer, fix whether the top-k routing
    weights are renormalized, and (olmoe) norm k over all heads without clamping q/k/v."""
    moe = spec.moe or MoESpec()
    n, used = expert_count(cfg), int(getattr(cfg, "num_experts_per_tok", 0) or 0)
    heads = int(cfg.num_attention_heads)
    problems = []
    if n < 2 or not 0 < used <= n:
        problems.append(f"{n} experts with {used} per token")
    dense = sorted({int(g.split(".")[1]) for g in names.values()
                    if re.fullmatch(r"blk\.\d+\.ffn_(gate|up|down)\.weight", g)})
    if dense:
        problems.append(f"layer(s) {', '.join(map(str, dense))} have a dense MLP (mlp_only_layers or "
                        f"decoder_sparse_step), but llama.cpp's {spec.gguf} has experts in every layer")
    slots: dict[str, set[int]] = {}
    for hf, e in experts.items():
        slots.setdefault(names[hf], set()).add(e)
    for g, got in sorted(slots.items()):
        if got != set(range(n)):
            problems.append(f"the checkpoint holds experts {sorted(got)[:3]}... of {g}, the config {n}")
            break
    norm = bool(getattr(cfg, "norm_topk_prob", moe.norm_topk))  # Mixtral: always renormalized
    if norm != moe.norm_topk:
        problems.append(f"norm_topk_prob is {norm}, but llama.cpp's {spec.gguf} "
                        f"{'always' if moe.norm_topk else 'never'} renormalizes the top-k routing weights")
    if spec.gguf == "olmoe":
        if int(getattr(cfg, "num_key_value_heads", None) or heads) != heads:
            problems.append("grouped-query attention, but llama.cpp's olmoe norms k over all heads "
                            "(num_key_value_heads must equal num_attention_heads)")
        if getattr(cfg, "clip_qkv", None) is not None:
            problems.append(f"clip_qkv={cfg.clip_qkv}, which llama.cpp's olmoe neither stores nor applies")
    if problems:
        raise UsageError(f"the gguf exporter cannot write this {hf_class} as llama.cpp runs it: "
                         + "; ".join(problems))


def permute_rows(rows: int, heads: int) -> torch.Tensor:
    """Row order llama.cpp's llama arch expects for q/k: each head's two rope halves interleaved."""
    hd = rows // heads
    return torch.arange(rows).reshape(heads, 2, hd // 2).transpose(1, 2).reshape(rows)

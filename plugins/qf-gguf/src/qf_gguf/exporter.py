"""Exporter ``gguf``: a GGUF v3 file that llama.cpp loads, written as llama.cpp's converter and
``llama-quantize`` would write it (``docs/gguf-export-reference.md``).

The exporter plans every tensor's GGML type before any quantization, by llama.cpp's file-type
rules (:mod:`qf_gguf.mixes`), so the quantizer rounds block linears onto exactly the grid that
is written. Tensors outside the decoder blocks are handled here as ``llama-quantize`` handles
them: the token embedding (and an untied output) quantized round-to-nearest to their planned
type, norms kept F32. Llama-family q/k rows are permuted into llama.cpp's interleaved-rope
order (GGML blocks never straddle rows, so permuting quantized rows equals quantizing permuted
rows). Tensor data is spilled to a temporary file as blocks stream in; :meth:`finish` writes
the header, metadata and data in llama-quantize's tensor order.

Mixtures of experts (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): the core hands over each expert's
linears one by one (``...experts.3.w1.weight``, each quantized by the quantizer like any block
linear); llama.cpp wants one 3-D tensor per layer and projection (``blk.N.ffn_gate_exps``,
``ffn_up_exps``, ``ffn_down_exps``: GGUF shape ``(in, out, n_expert)``, expert 0's rows first).
The plan gives every expert of a stacked tensor that tensor's type; each expert's bytes go to
the spill as they arrive, and the stacked tensor is written from its pieces, so no expert is
held in memory. The router (``ffn_gate_inp``) and Qwen2-MoE's shared-expert gate stay F32, as
llama-quantize keeps them. Configurations llama.cpp's graphs cannot reproduce (dense layers
between MoE ones, another top-k normalization than the arch's, OLMoE with grouped-query
attention or clip_qkv) are refused before any work.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from quantfoundry import (
    Engine,
    Exporter,
    Format,
    Options,
    QuantizedWeight,
    QuantPlan,
    TensorPlan,
    resolve_format,
)
from quantfoundry.errors import ArtifactError, EngineUnavailable, IncompatiblePlanError, UsageError
from quantfoundry.toolkit import PROMPT

from .archs import (
    SUPPORTED,
    ArchSpec,
    check_moe,
    expert_count,
    expert_index,
    fused_experts,
    gguf_name,
    permute_rows,
)
from .engine import LlamaCppEngine
from .imatrix import Imatrix, ImatrixEntry, read_imatrix, write_imatrix
from .inspect import gguf_file, inspect_gguf
from .legacy import GGMLFormat
from .mixes import FILE_TYPES, MixContext, choose_types
from .reader import TransformersGGUFEngine
from .vocab import add_vocab, check_vocab

GGUF_FILE = "model.gguf"
IMATRIX_FILE = "imatrix.gguf"
MODELFILE = "Modelfile"  # Ollama's: ollama create NAME -f OUT/Modelfile  # the run's collected imatrix, shipped beside the model
# --format T with the gguf exporter: a "pure" file of T, with llama.cpp's file-type id for T
_PURE_FILE_TYPE = {"Q2_K": "Q2_K", "Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M", "Q6_K": "Q6_K",
                   "Q8_0": "Q8_0", "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1"}
#: the types a planner may choose per tensor (rows of whole 256-blocks; else of 32-blocks)
MIX_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
MIX_TYPES_32 = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


@dataclass(frozen=True, kw_only=True)
class GGUFOptions(Options):
    type: str = field(default="Q4_K_M", metadata={
        "help": "llama.cpp file type: " + ", ".join(FILE_TYPES) + " (ignored when --format names a GGML type)"})
    tensor_type: str = field(default="", metadata={
        "help": "per-tensor overrides as llama-quantize's --tensor-type: REGEX=TYPE, several separated by ';'"})
    pure: bool = field(default=False, metadata={"help": "one type for every tensor (no mix rules)"})
    chat_template: Path | None = field(default=None, metadata={
        "help": "a Jinja chat template file to write instead of the tokenizer's"})
    imatrix: Path | None = field(default=None, metadata={
        "help": "a llama.cpp importance matrix (GGUF or .dat, e.g. from llama-imatrix) to quantize with"})

    def __post_init__(self) -> None:
        if self.type.upper() not in FILE_TYPES:
            raise ValueError(f"type must be one of {', '.join(FILE_TYPES)}, got {self.type!r}")
        for item in self.overrides():
            if item[1] not in _PURE_FILE_TYPE and item[1] not in ("F16", "F32"):
                raise ValueError(f"tensor_type {item[0]}={item[1]}: unknown GGML type")

    def overrides(self) -> list[tuple[str, str]]:
        out = []
        for part in filter(None, (p.strip() for p in self.tensor_type.split(";"))):
            regex, eq, typ = part.rpartition("=")
            if not eq or not regex:
                raise ValueError(f"tensor_type {part!r}: write REGEX=TYPE")
            out.append((regex, typ.strip().upper()))
        return out


class GGUFExporter(Exporter):
    name = "gguf"
    description = "GGUF v3 for llama.cpp / Ollama: GGML types by llama.cpp's file-type rules"
    Options = GGUFOptions
    default_format: ClassVar[str | None] = None

    options: GGUFOptions

    @classmethod
    def claims(cls, path: Path) -> bool:
        return gguf_file(path) is not None

    @classmethod
    def inspect(cls, path: Path) -> dict[str, Any]:
        return inspect_gguf(path)

    @classmethod
    def presets(cls) -> list[tuple[str, str]]:
        """llama.cpp's file types with their bits per weight on Llama-2-7B's tensor shapes."""
        return [(ft, f"llama.cpp file type {ft}: {bpw:.3f} bits per weight on Llama-2-7B shapes "
                     f"(default type {FILE_TYPES[ft][0]})") for ft, bpw in file_type_bpw().items()]

    @classmethod
    def preset_formats(cls, shape: Any, preset: str) -> dict[str, Format | None] | None:
        """Each tensor's GGML type under llama.cpp's file type ``preset`` (its mix rules, with the
        expert count's own rules for a MoE), from the model's tensor names and shapes alone."""
        ft = preset.upper()
        if ft not in FILE_TYPES:
            return None
        cfg = shape.config.get_text_config()
        spec = SUPPORTED.get((getattr(shape.config, "architectures", None) or [""])[0]) or ArchSpec("llama")
        names: dict[str, str] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        for t in shape.tensors:
            fused = fused_experts(t.name, spec)
            if fused and len(t.shape) == 3:  # [E, rows, cols]: one stacked tensor per row slice
                for g in fused:  # gate and up take one type by every rule of the mixes
                    shapes[g] = (t.shape[2], t.shape[1] // len(fused), t.shape[0])
                names[t.name] = fused[0]
                continue
            g = gguf_name(t.name, spec)
            if g is not None:
                names[t.name] = g
                shapes[g] = tuple(reversed(t.shape))
        heads = int(cfg.num_attention_heads)
        ctx = MixContext(n_layer=int(cfg.num_hidden_layers), n_head=heads,
                         n_head_kv=int(getattr(cfg, "num_key_value_heads", None) or heads),
                         n_expert=int(getattr(shape, "experts", 0) or 0))
        types = choose_types(ft, shapes, ctx)
        out: dict[str, Format | None] = {}
        for t in shape.tensors:
            typ = types.get(names.get(t.name, ""))
            out[t.name] = resolve_format(typ) if typ not in (None, "F16", "F32") else None
        return out

    def artifact_label(self) -> str | None:
        return self.options.type.upper()

    def run_command(self, folder: Path) -> str | None:
        """llama.cpp's plain completion tool (``llama-cli`` is its chat; docs/deploy.md: Ollama)."""
        import shlex

        return (f"llama-completion -m {shlex.quote(str(Path(folder) / GGUF_FILE))} -no-cnv "
                f"-p {shlex.quote(PROMPT)} -n 32")

    def stored_float_dtype(self, name: str, dtype: torch.dtype) -> torch.dtype:
        g = self._names.get(name)
        if g is None:  # not written (e.g. a tied output weight)
            return dtype
        typ = self._types.get(g) or "F32"  # no type: kept F32, as the writer does
        return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(typ, dtype)

    # -- what it stores ----------------------------------------------------------------------
    def check_format(self, fmt: Format) -> str | None:
        return None if isinstance(fmt, GGMLFormat) else f"{fmt.spec} is not a GGML block type"

    def storable(self) -> str:
        return "GGML types (" + ", ".join(_PURE_FILE_TYPE) + ") and file types " + ", ".join(FILE_TYPES)

    def _file_type(self, requested: Format | None) -> tuple[str, bool]:
        if requested is None:
            return self.options.type.upper(), self.options.pure
        if not isinstance(requested, GGMLFormat):
            raise IncompatiblePlanError(f"exporter 'gguf' cannot store {requested.spec}; choose a GGML type "
                                        f"({', '.join(_PURE_FILE_TYPE)}) or --exporter-opt type=Q4_K_M")
        return _PURE_FILE_TYPE[requested.ggml_name], True

    def plan(self, source: Any, requested: Format | None, *, collects_importance: bool = False) -> QuantPlan:
        spec = SUPPORTED.get(source.hf_class)
        if spec is None:
            raise UsageError(f"the gguf exporter does not support {source.hf_class} yet; it writes "
                             f"{', '.join(SUPPORTED)}")
        cfg = source.config.get_text_config()
        file_type, pure = self._file_type(requested)
        shapes: dict[str, tuple[int, ...]] = {}
        self._names: dict[str, str] = {}
        self._experts: dict[str, int] = {}  # an expert linear's weight → its slice of the stacked tensor
        self._n_expert = expert_count(cfg) if spec.moe is not None else 0
        for hf, (_, shape) in source.tensor_info.items():
            g = gguf_name(hf, spec)
            if g is None:
                continue
            self._names[hf] = g
            e = expert_index(hf) if spec.moe is not None else None
            if e is None:
                shapes[g] = tuple(reversed(shape))
            else:  # GGUF order: (in, out, n_expert)
                self._experts[hf] = e
                shapes[g] = (*reversed(shape), self._n_expert)
        if spec.moe is not None:
            check_moe(source.hf_class, spec, cfg, self._names, self._experts)
        check_vocab(Path(str(source.path)), spec.gemma or spec.gguf)
        self._imatrix = read_imatrix(self.options.imatrix) if self.options.imatrix is not None else None
        ctx = MixContext(n_layer=int(cfg.num_hidden_layers), n_head=int(cfg.num_attention_heads),
                         n_head_kv=int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads),
                         n_expert=self._n_expert, overrides=self.options.overrides(), pure=pure,
                         has_imatrix=self._imatrix is not None or collects_importance)
        self._types = choose_types(file_type, shapes, ctx)
        self._file_type_name, self._spec, self._cfg = file_type, spec, cfg
        plan = QuantPlan()
        linears = source.linear_shapes()
        for name in source.architecture.embeddings:
            g = self._names.get(f"{name}.weight")
            typ = self._types.get(g) if g else None
            if g is not None and name not in linears and typ not in (None, "F16", "F32"):
                # llama.cpp quantizes the token embedding too (round-to-nearest, its file-type rule)
                plan.add(TensorPlan(name, tuple(source.tensor_info[f"{name}.weight"][1]), resolve_format(typ)))
        for name, shape in linears.items():
            g = self._names.get(f"{name}.weight")
            typ = self._types.get(g) if g else None
            if not source.is_block_linear(name):
                if g is None:  # tied: llama.cpp reads the token embedding
                    typ = self._types.get("token_embd.weight")
                    plan.add(TensorPlan(name, shape, None, reason=f"tied to the token embedding, written once "
                                                                  f"as token_embd ({typ or 'F32'})"))
                elif typ in (None, "F16", "F32"):
                    plan.add(TensorPlan(name, shape, None, reason=f"kept {typ or 'F32'} (llama.cpp's rule)"))
                else:  # llama.cpp's output.weight rule (Q6_K for most file types), round-to-nearest
                    plan.add(TensorPlan(name, shape, resolve_format(typ)))
            elif typ in (None, "F16", "F32"):
                plan.add(TensorPlan(name, shape, None, reason=f"kept {typ or 'F32'} (llama.cpp's fallback)"))
            else:
                plan.add(TensorPlan(name, shape, resolve_format(typ)))
        return plan

    def mix_candidates(self, source: Any, plan: QuantPlan) -> dict[str, tuple[Format | None, ...]]:
        """llama.cpp reads any GGML type per tensor: every tensor the file type quantizes (block
        linears, the token embedding, an untied output) may take any K-quant (Q2_K … Q6_K) and
        Q8_0 when its rows are whole 256-blocks, else the 32-blocks (Q4_0, Q4_1, Q5_0, Q5_1,
        Q8_0), as llama-quantize's fallback does."""
        out: dict[str, tuple[Format | None, ...]] = {}
        for name, entry in plan.quantized().items():
            cols = int(entry.shape[1])
            types = MIX_TYPES if cols % 256 == 0 else MIX_TYPES_32 if cols % 32 == 0 else ()
            if types:
                out[name] = tuple(resolve_format(t) for t in types)
        return out

    def mix_ties(self, source: Any, plan: QuantPlan) -> list[tuple[str, ...]]:
        """The experts of one stacked tensor (``blk.N.ffn_up_exps``) are one GGML tensor of one type."""
        stacks: dict[str, list[str]] = {}
        for hf in self._experts:
            stacks.setdefault(self._names[hf], []).append(hf.removesuffix(".weight"))
        return [tuple(sorted(names)) for _, names in sorted(stacks.items())]

    def adopt_plan(self, source: Any, plan: QuantPlan) -> None:
        """Write each tensor as the planner chose; the file type (``general.file_type``) is the
        ``_M`` file type of the type that holds the most block-linear weights."""
        held: dict[str, int] = {}
        chosen: dict[str, str | None] = {}  # a stacked tensor's type, from its first expert
        for name, entry in plan.entries.items():
            g = self._names.get(f"{name}.weight")
            if g is None or g not in self._types:
                continue
            if entry.format is not None and not isinstance(entry.format, GGMLFormat):
                raise IncompatiblePlanError(f"exporter 'gguf' cannot store {entry.format.spec} ({name})")
            typ = None if entry.format is None else entry.format.ggml_name
            if f"{name}.weight" in self._experts:
                if chosen.setdefault(g, typ) != typ:
                    raise IncompatiblePlanError(f"the experts of {g} were planned in several formats ({chosen[g]}, "
                                                f"{typ}); a stacked GGUF tensor has one type")
            if entry.format is None:
                self._types[g] = "F16" if self._types[g] is not None else None
                continue
            self._types[g] = entry.format.ggml_name
            if source.is_block_linear(name):
                held[entry.format.ggml_name] = held.get(entry.format.ggml_name, 0) + \
                    int(entry.shape[0]) * int(entry.shape[1])
        if held:
            self._file_type_name = _PURE_FILE_TYPE[max(held, key=lambda t: held[t])]

    def importance(self, source: Any) -> dict[str, torch.Tensor] | None:
        """The imatrix file's entries, by linear module name (llama.cpp looks them up by GGUF name;
        an entry of the wrong width is an error there and here)."""
        if self._imatrix is None:
            return None
        out = {}
        for hf in self._names:
            if hf.endswith(".weight"):
                imp = self._importance_of(hf, int(source.tensor_info[hf][1][-1]))
                if imp is not None:
                    out[hf.removesuffix(".weight")] = imp
        return out

    def _importance_of(self, hf: str, width: int) -> torch.Tensor | None:
        """The imatrix entry of ``hf``'s GGUF tensor; an expert's slice of a stacked one (llama.cpp
        keeps one row of column means per expert)."""
        g = self._names[hf]
        imp = self._imatrix.importance(g) if self._imatrix is not None else None
        if imp is None:
            return None
        e = self._experts.get(hf)
        mats = 1 if e is None else self._n_expert
        if imp.numel() != width * mats:
            if g == "token_embd.weight":  # llama-quantize ignores a token embedding entry of another size
                return None
            raise UsageError(f"imatrix entry {g} has {imp.numel()} values, the tensor {width} columns"
                             + (f" x {mats} experts" if e is not None else "") + ": the imatrix belongs to another model")
        return imp if e is None else imp.reshape(mats, width)[e].clone()

    def collected_importance(self, importance: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
        """Ship the run's imatrix beside the GGUF (``imatrix.gguf``, llama.cpp's format, keyed by
        GGUF names) and record it in the metadata as llama-quantize records an imatrix."""
        by_gguf: dict[str, torch.Tensor] = {}
        stacks: dict[str, dict[int, torch.Tensor]] = {}
        for n, m in importance.items():
            hf = f"{n}.weight"
            if hf in self._experts:
                stacks.setdefault(self._names[hf], {})[self._experts[hf]] = m
            elif hf in self._names:
                by_gguf[self._names[hf]] = m
        tokens = int(info["tokens"])
        self._collected = Imatrix.from_means(by_gguf, tokens=tokens, dataset=Path(str(info["source"])).name,
                                             chunk_size=int(info["seq_len"]), chunk_count=int(info["samples"]))
        for g, means in stacks.items():  # one row per expert, as llama-imatrix keeps them
            self._collected.entries[g] = ImatrixEntry.of_experts([means.get(e) for e in range(self._n_expert)],
                                                                 tokens)

    # -- writing -----------------------------------------------------------------------------
    def begin(self, folder: Path, source: Any, plan: QuantPlan) -> None:
        if not hasattr(self, "_types"):
            self.plan(source, None)
        self._folder, self._source = Path(folder), source
        self._spill_path = self._folder / ".tensors.spill"
        self._collected: Imatrix | None = None
        self._spill = open(self._spill_path, "wb")
        # GGUF name -> torch-order shape, type, and its pieces in the spill: (offset, nbytes) each,
        # one per expert (in expert order) for a stacked tensor
        self._entries: dict[str, tuple[tuple[int, ...], str, list[tuple[int, int]]]] = {}
        self._arrived: dict[str, dict[int, tuple[int, int]]] = {}  # a stacked tensor's experts so far

    def _permutation(self, g: str, rows: int) -> torch.Tensor | None:
        cfg = self._cfg
        if not self._spec.permute_qk:
            return None
        if g.endswith("attn_q.weight") or g.endswith("attn_q.bias"):
            return permute_rows(rows, int(cfg.num_attention_heads))
        if g.endswith("attn_k.weight") or g.endswith("attn_k.bias"):
            return permute_rows(rows, int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads))
        return None

    def write(self, name: str, tensor: torch.Tensor | QuantizedWeight) -> None:
        """Spill one tensor's bytes; an expert's weight is one piece of its stacked tensor, which
        is complete once every expert arrived (nothing is held in memory meanwhile)."""
        g = self._names.get(name)
        if g is None:
            return
        typ = self._types.get(g)
        if isinstance(tensor, QuantizedWeight):
            fmt = tensor.format
            if not isinstance(fmt, GGMLFormat) or fmt.ggml_name != typ:
                raise ArtifactError(f"{name} arrived as {fmt.spec}, but the plan wrote {typ}")
            data = fmt.ggml_bytes(tensor)
            shape = tuple(tensor.shape)
        else:
            t = tensor.detach().to(torch.float32)
            if self._spec.gemma and name.endswith("norm.weight"):
                t = t + 1  # Gemma's RMSNorm scales by (1 + w); llama.cpp stores 1 + w, in float32
            shape = tuple(t.shape)
            if typ in (None, "F32"):
                data = t
            elif typ == "F16":
                data = t.to(torch.float16)
            else:  # llama-quantize's own round-to-nearest (with the imatrix entry, if the file has one)
                fmt = resolve_format(typ)
                data = fmt.ggml_bytes(fmt.quantize(t, self._importance_of(name, shape[-1])))
        perm = self._permutation(g, shape[0])
        if perm is not None:
            data = data[perm]
        raw = data.contiguous().view(torch.uint8).numpy().tobytes() if data.dtype != torch.uint8 else \
            data.contiguous().numpy().tobytes()
        piece = (self._spill.tell(), len(raw))
        self._spill.write(raw)
        e = self._experts.get(name)
        if e is None:
            self._entries[g] = (shape, typ or "F32", [piece])
            return
        arrived = self._arrived.setdefault(g, {})
        if e in arrived or g in self._entries:
            raise ArtifactError(f"the gguf exporter received expert {e} of {g} twice ({name})")
        arrived[e] = piece
        if len(arrived) == self._n_expert:  # every expert is in: the stacked tensor, expert-major
            self._entries[g] = ((self._n_expert, *shape), typ or "F32", [arrived[i] for i in range(self._n_expert)])
            del self._arrived[g]

    def finish(self, manifest: dict[str, Any]) -> dict[str, Any]:
        import gguf

        self._spill.close()
        missing = sorted(set(self._types) - set(self._entries))
        if missing:
            partial = {g: sorted(set(range(self._n_expert)) - set(self._arrived[g])) for g in missing
                       if g in self._arrived}
            raise ArtifactError(f"the gguf exporter never received {', '.join(missing[:3])}"
                                + "".join(f" ({g}: experts {e[:3]} missing)" for g, e in list(partial.items())[:1]))
        path = self._folder / GGUF_FILE
        w = gguf.GGUFWriter(str(path), self._spec.gguf)
        self._metadata(w)
        order = sorted(self._entries, key=_weights_map_key)
        for g in order:
            shape, typ, pieces = self._entries[g]
            nbytes = sum(n for _, n in pieces)
            while len(shape) > 1 and shape[0] == 1:  # as ggml counts dimensions (llama-quantize writes so)
                shape = shape[1:]
            if typ in ("F32", "F16"):
                w.add_tensor_info(g, shape, np.dtype(np.float32 if typ == "F32" else np.float16), nbytes)
            else:  # quantized: the writer takes the byte shape (rows of bytes) and derives the logical one
                rows = int(np.prod(shape[:-1]))
                w.add_tensor_info(g, (*shape[:-1], nbytes // rows), np.dtype(np.uint8), nbytes,
                                  raw_dtype=gguf.GGMLQuantizationType[typ])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        with open(self._spill_path, "rb") as spill:
            for g in order:
                w.write_tensor_data(_Spilled(spill, self._entries[g][2]))
        w.close()
        self._spill_path.unlink()
        if self._collected is not None:
            write_imatrix(self._collected, self._folder / IMATRIX_FILE)
        modelfile_info = self._write_modelfile()
        counts: dict[str, int] = {}
        for _, typ, _ in self._entries.values():
            counts[typ] = counts.get(typ, 0) + 1
        return {"gguf": {"file": GGUF_FILE, "file_type": self._file_type_name, "tensor_types": counts,
                         "bytes": path.stat().st_size,
                         "imatrix": IMATRIX_FILE if self._collected is not None else self.options.imatrix,
                         "modelfile": modelfile_info}}

    def _write_modelfile(self) -> dict[str, Any]:
        """Ollama's Modelfile beside the GGUF: the chat template translated and checked, the
        default system prompt, a stop for every end-of-generation token."""
        from .modelfile import modelfile

        tokenizer = self._source.tokenizer()
        if self.options.chat_template is not None:
            tokenizer.chat_template = Path(self.options.chat_template).read_text()
        text, notes = modelfile(tokenizer, Path(str(self._source.path)), GGUF_FILE)
        (self._folder / MODELFILE).write_text(text)
        return {"file": MODELFILE, "template": "TEMPLATE" in text, "notes": notes}

    def _metadata(self, w: Any) -> None:
        import gguf

        cfg, src = self._cfg, self._source
        w.add_type("model")
        w.add_name(src.name)
        heads = int(cfg.num_attention_heads)
        kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        if self._spec.gemma in ("gemma", "gemma2"):
            self._gemma_keys(w, cfg, heads, kv, head_dim)
        else:
            self._common_keys(w, cfg, heads, kv, head_dim)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_vocab(w, Path(str(src.path)), int(cfg.vocab_size), chat_template=self.options.chat_template,
                  arch=self._spec.gemma or self._spec.gguf)
        im, im_file = (self._imatrix, str(self.options.imatrix)) if self._imatrix is not None else \
            (self._collected, IMATRIX_FILE)
        if im is not None:  # the keys llama-quantize appends (tools/quantize/quantize.cpp)
            w.add_string("quantize.imatrix.file", im_file[:127])
            if im.datasets:
                w.add_string("quantize.imatrix.dataset", im.datasets[0][:127])
            w.add_uint32("quantize.imatrix.entries_count", len(im.entries))
            if im.chunk_count > 0:
                w.add_uint32("quantize.imatrix.chunks_count", int(im.chunk_count))

    def _common_keys(self, w: Any, cfg: Any, heads: int, kv: int, head_dim: int) -> None:
        """``TextModel.set_gguf_parameters`` (llama, qwen2, qwen3, gemma3 and the mixtures of
        experts) plus the arch's own keys."""
        w.add_block_count(int(cfg.num_hidden_layers))
        w.add_context_length(int(cfg.max_position_embeddings))
        w.add_embedding_length(int(cfg.hidden_size))
        w.add_feed_forward_length(int(cfg.intermediate_size))
        w.add_head_count(heads)
        w.add_head_count_kv(kv)
        rope = dict(getattr(cfg, "rope_parameters", None) or {})
        full = rope.get("full_attention", rope)
        rtype = full.get("rope_type") or full.get("type")
        if rtype == "linear" and full.get("factor"):
            w.add_rope_scaling_type(__import__("gguf").RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(full["factor"]))
        elif rtype not in (None, "default"):
            raise UsageError(f"rope scaling {rtype!r} is not exported by qf's gguf exporter yet")
        theta = full.get("rope_theta", getattr(cfg, "rope_theta", None))
        if theta is not None:
            w.add_rope_freq_base(float(theta))
        if "sliding_attention" in rope and rope["sliding_attention"].get("rope_theta") is not None:
            w.add_rope_freq_base_swa(float(rope["sliding_attention"]["rope_theta"]))
        # the converter's olmoe class overwrites the config's epsilon with 1e-5 (OLMoE's own value)
        w.add_layer_norm_rms_eps(1e-5 if self._spec.gguf == "olmoe" else float(cfg.rms_norm_eps))
        moe = self._spec.moe
        if moe is not None:
            w.add_expert_count(self._n_expert)
            w.add_expert_used_count(int(cfg.num_experts_per_tok))
        if getattr(cfg, "head_dim", None) is not None:  # the converter writes them when the config has head_dim
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        w.add_file_type(FILE_TYPES[self._file_type_name][1])
        if self._spec.llama_keys:
            w.add_vocab_size(int(cfg.vocab_size))
            w.add_rope_dimension_count(head_dim)
        if moe is not None and moe.expert_ff_keys:  # Qwen2MoeModel (and Qwen3MoeModel, its subclass)
            if getattr(cfg, "moe_intermediate_size", None) is not None:
                w.add_expert_feed_forward_length(int(cfg.moe_intermediate_size))
            if getattr(cfg, "shared_expert_intermediate_size", None) is not None:
                w.add_expert_shared_feed_forward_length(int(cfg.shared_expert_intermediate_size))
        if self._spec.gemma == "gemma3":
            if getattr(cfg, "final_logit_softcapping", None):
                w.add_final_logit_softcapping(float(cfg.final_logit_softcapping))
            if getattr(cfg, "sliding_window", None) is not None:
                w.add_sliding_window(int(cfg.sliding_window))

    def _gemma_keys(self, w: Any, cfg: Any, heads: int, kv: int, head_dim: int) -> None:
        """Gemma and Gemma 2 write their own list (no rope base, no vocab size)."""
        w.add_context_length(int(cfg.max_position_embeddings))
        w.add_embedding_length(int(cfg.hidden_size))
        w.add_block_count(int(cfg.num_hidden_layers))
        w.add_feed_forward_length(int(cfg.intermediate_size))
        w.add_head_count(heads)
        w.add_head_count_kv(kv)
        w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_file_type(FILE_TYPES[self._file_type_name][1])
        if self._spec.gemma == "gemma2":
            w.add_attn_logit_softcapping(float(cfg.attn_logit_softcapping))
            w.add_final_logit_softcapping(float(cfg.final_logit_softcapping))
            w.add_sliding_window(int(cfg.sliding_window))

    def engine(self, folder: Path, device: torch.device) -> Engine:
        """The GGUF in llama.cpp (llama-cpp-python): ``qf eval`` and the run's artifact check;
        without llama-cpp-python, transformers' GGUF reader (no compiler needed)."""
        try:
            return LlamaCppEngine(Path(folder) / GGUF_FILE, device)
        except EngineUnavailable as missing:
            return TransformersGGUFEngine(Path(folder) / GGUF_FILE, device, instead_of=str(missing))

    def verify(self, folder: Path) -> None:
        from gguf import GGMLQuantizationType, GGUFReader

        path = Path(folder) / GGUF_FILE
        try:
            reader = GGUFReader(str(path))
        except Exception as exc:
            raise ArtifactError(f"{path} does not read back as GGUF: {exc}") from None
        got = {t.name: GGMLQuantizationType(t.tensor_type).name for t in reader.tensors}
        want = {g: e[1] for g, e in self._entries.items()}
        if got != want:
            diff = sorted(set(got.items()) ^ set(want.items()))[:3]
            raise ArtifactError(f"{path}: tensors read back differ from what was written: {diff}")


class _Spilled:
    """One tensor's bytes in the spill file, as ``GGUFWriter.write_tensor_data`` takes an array
    (it reads ``nbytes`` and calls ``tofile``): its pieces (one per expert of a stacked tensor)
    are copied in slabs, so no tensor is ever whole in memory."""

    SLAB = 64 << 20

    def __init__(self, spill: Any, pieces: list[tuple[int, int]]):
        self.spill, self.pieces = spill, pieces
        self.nbytes = sum(n for _, n in pieces)

    def tofile(self, fout: Any) -> None:
        for offset, n in self.pieces:
            self.spill.seek(offset)
            while n > 0:
                chunk = self.spill.read(min(n, self.SLAB))
                if not chunk:
                    raise ArtifactError("the gguf exporter's spill file ended early; the disk may be full")
                fout.write(chunk)
                n -= len(chunk)


def bytes_per_weight(typ: str) -> float:
    """Stored bytes per weight of a GGML type (F16/F32, or a block type's block bytes / block)."""
    if typ in ("F16", "F32"):
        return 2.0 if typ == "F16" else 4.0
    fmt = resolve_format(typ)
    if not isinstance(fmt, GGMLFormat):
        raise ValueError(f"{typ} is not a GGML type")
    return fmt.block_bytes / fmt.block


def file_type_bpw(n_layer: int = 32, n_embd: int = 4096, n_ff: int = 11008, n_vocab: int = 32000) -> dict[str, float]:
    """Whole-file bits per weight of every file type on a Llama-2-7B-shaped tensor list."""
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (n_embd, n_vocab), "output.weight": (n_embd, n_vocab),
                                          "output_norm.weight": (n_embd,)}
    for i in range(n_layer):
        for t, shp in (("attn_q", (n_embd, n_embd)), ("attn_k", (n_embd, n_embd)), ("attn_v", (n_embd, n_embd)),
                       ("attn_output", (n_embd, n_embd)), ("ffn_gate", (n_embd, n_ff)), ("ffn_up", (n_embd, n_ff)),
                       ("ffn_down", (n_ff, n_embd)), ("attn_norm", (n_embd,)), ("ffn_norm", (n_embd,))):
            shapes[f"blk.{i}.{t}.weight"] = shp
    out = {}
    for ft in FILE_TYPES:
        types = choose_types(ft, shapes, MixContext(n_layer=n_layer, n_head=32, n_head_kv=32))
        n = sum(int(np.prod(s)) for s in shapes.values())
        nbytes = sum(int(np.prod(shapes[k])) * bytes_per_weight(t or "F32") for k, t in types.items())
        out[ft] = 8 * nbytes / n
    return out


def _weights_map_key(name: str) -> tuple[int, str]:
    m = re.match(r"blk\.(\d+)\.", name)
    return (int(m.group(1)) if m else -1, name)


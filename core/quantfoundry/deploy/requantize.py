"""Quantized inputs: what a path holds when it is already quantized, and — only when asked with
``--force-requantize`` — its weights dequantized into a float checkpoint to quantize again.

Rounding weights that were rounded already adds the second rounding's loss to the first's, and
the run's report, which compares against its input, would show only the second. So ``qf run``
refuses a GGUF file, a GPTQ/AWQ/bitsandbytes/compressed-tensors checkpoint and a ``qf``
artifact, naming the float source where the input records it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ..errors import AlreadyQuantizedError, ModelLoadError

GGUF_MAGIC = b"GGUF"
FIX = ("quantize the original fp16/bf16 checkpoint{source} instead, or pass --force-requantize to dequantize it "
       "first (the losses of both roundings add up, and the report can measure only the second)")


def gguf_file(path: Path) -> Path | None:
    """The GGUF file ``path`` is, or the one GGUF file of a folder without config.json."""
    if path.is_file():
        with open(path, "rb") as f:
            return path if f.read(4) == GGUF_MAGIC else None
    if path.is_dir() and not (path / "config.json").is_file():
        found = sorted(path.glob("*.gguf"))
        return found[0] if len(found) == 1 else None
    return None


def _gguf_facts(path: Path) -> dict[str, str]:
    try:
        import gguf
    except ImportError:
        return {}
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception:
        return {}
    out = {}
    for key in ("general.name", "general.base_model.0.name", "general.base_model.0.repo_url", "general.file_type"):
        field = reader.fields.get(key)
        if field is not None and field.data:
            value = field.parts[field.data[0]]
            out[key] = bytes(value).decode("utf-8", "replace") if value.dtype.kind == "u" and value.itemsize == 1 \
                else str(int(value[0]))
    return out


def quantized_input(path: Path) -> tuple[str, str] | None:
    """``(what it is, where its float source is)`` if ``path`` holds a quantized model, else None."""
    g = gguf_file(path)
    if g is not None:
        facts = _gguf_facts(g)
        base = facts.get("general.base_model.0.repo_url") or facts.get("general.base_model.0.name")
        name = facts.get("general.name")
        source = f" ({base})" if base else f" of {name!r}" if name else ""
        return f"{g} is a GGUF file (llama.cpp's quantized weights)", source
    config = path / "config.json"
    if not config.is_file():
        return None
    try:
        raw = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    qc = raw.get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method", "unknown")
    manifest = path / "quantfoundry.json"
    if manifest.is_file():
        try:
            src = json.loads(manifest.read_text()).get("source", {}).get("path")
        except (OSError, ValueError):
            src = None
        return f"{path} is a qf artifact", f" ({src})" if src else ""
    name = raw.get("_name_or_path")
    return f"{path} is already quantized ({method})", f" ({name})" if name and name != str(path) else ""


def refuse(path: Path) -> None:
    """Raise :class:`AlreadyQuantizedError` when ``path`` holds a quantized model."""
    found = quantized_input(path)
    if found is not None:
        what, source = found
        raise AlreadyQuantizedError(f"{what}: " + FIX.format(source=source))


def dequantize(path: Path, out: Path, *, trust_remote_code: bool = False) -> dict[str, Any]:
    """Write ``path``'s weights dequantized as a float checkpoint folder ``out`` (safetensors,
    config without ``quantization_config``, the tokenizer): a GGUF through transformers' GGUF
    reader, a qf artifact through ``qf load``, any other quantized checkpoint through
    transformers' own dequantization. Returns what the manifest should record."""
    import torch

    found = quantized_input(path)
    if found is None:
        raise ModelLoadError(f"{path} is not a quantized model; nothing to dequantize")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    g = gguf_file(path)
    info: dict[str, Any] = {"from": str(path), "what": found[0]}
    try:
        if g is not None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            model, loaded = AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name, dtype=torch.float32,
                                                                 output_loading_info=True)
            missing = sorted(loaded["missing_keys"])
            if missing:  # a Mixtral GGUF ("llama" with experts) reads as a dense llama without its MLPs
                raise ModelLoadError(f"transformers' GGUF reader builds {model.config.model_type!r} from {g.name} "
                                     f"without {len(missing)} of its weights ({missing[0]}, ...): it cannot "
                                     "dequantize this architecture; requantize from the float checkpoint")
            AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name).save_pretrained(str(tmp))
            info["reader"] = "transformers' GGUF reader"
        elif (path / "quantfoundry.json").is_file():
            model = _float_qf_artifact(path)
            _copy_tokenizer(path, tmp)
            info["reader"] = "qf load"
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=trust_remote_code)
            if hasattr(model, "dequantize"):
                model = model.dequantize() or model
            _copy_tokenizer(path, tmp)
            info["reader"] = "transformers (its quantizer's dequantize)"
        _save_float(model, tmp)
    except (AlreadyQuantizedError, ModelLoadError):
        raise
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot dequantize {path} ({found[0]}): {first}") from None
    config = json.loads((tmp / "config.json").read_text())
    config.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return info


def _save_float(model: Any, folder: Path) -> None:
    """The model's parameters in bfloat16 as ``model.safetensors`` (a tied output weight once, as
    transformers saves it) and its config without quantization settings."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in model.state_dict().items():
        if not t.is_floating_point():
            continue
        if t.data_ptr() in seen:  # tied to a tensor already written (lm_head to the embedding)
            continue
        seen.add(t.data_ptr())
        tensors[name] = t.detach().to(torch.bfloat16).contiguous().cpu()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.torch_dtype = torch.bfloat16
    if not getattr(config, "architectures", None):  # a config built from GGUF metadata names none
        config.architectures = [type(model).__name__]
    config.save_pretrained(str(folder))


def _float_qf_artifact(path: Path) -> Any:
    """A qf artifact reloaded with every QuantLinear replaced by a float Linear of its values."""
    import torch
    from torch import nn

    from ..files import read_manifest
    from ..plugins import get_component
    from ..roles.kernel import QuantLinear

    exporter = get_component("exporter", read_manifest(path)["exporter"]["name"])()
    model = exporter.load(path, torch.device("cpu"), None, torch.float32)
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            w = module.qweight.dequantize(torch.float32)
            linear = nn.Linear(w.shape[1], w.shape[0], bias=module.bias is not None)
            linear.weight.data.copy_(w)
            if module.bias is not None:
                linear.bias.data.copy_(module.bias.float())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, linear)
    return model


def _copy_tokenizer(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for pattern in ("tokenizer*", "special_tokens_map.json", "*.model", "vocab.json", "merges.txt",
                    "chat_template.jinja", "generation_config.json"):
        for f in src.glob(pattern):
            if f.is_file():
                shutil.copy2(f, dst / f.name)

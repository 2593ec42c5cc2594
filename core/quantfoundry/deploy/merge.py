"""``qf merge``: PEFT LoRA adapters merged into a float checkpoint — one canonical fp16/bf16
model to quantize from — with a marker that makes the merge checkable.

Merging twice adds an adapter's update twice, and merging onto a quantized base adds a float
update to rounded weights that are then rounded again: both degrade the model without an error.
So a merge refuses a base that is quantized and a base that already carries a merge marker, and
writes ``qf-merge.json`` (base and adapter paths and hashes) beside the merged weights; ``qf run``
copies it into the manifest.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from ..errors import AlreadyQuantizedError, ModelLoadError, UsageError
from ..files import write_json_atomic
from .requantize import quantized_input

MARKER = "qf-merge.json"
ADAPTER_CONFIG = "adapter_config.json"


def merge_marker(folder: Path) -> dict[str, Any] | None:
    """What ``qf merge`` recorded in ``folder``, or None."""
    path = Path(folder) / MARKER
    if not path.is_file():
        return None
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {"unreadable": str(path)}


def is_adapter(folder: Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file() and not (Path(folder) / "config.json").is_file()


def adapter_hint(folder: Path) -> str:
    """How to turn a PEFT adapter folder into a model to quantize."""
    try:
        base = json.loads((Path(folder) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path") or "BASE"
    except (OSError, ValueError):
        base = "BASE"
    return (f"{folder} is a PEFT adapter, not a model: merge it into its base first, then quantize the merged "
            f"checkpoint: qf merge --base {base} --adapter {folder} --out merged && qf run --model merged")


def _files_sha256(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def merge(base: str | Path, adapter: str | Path, out: str | Path, *, dtype: str | None = None,
          overwrite: bool = False, trust_remote_code: bool = False) -> dict[str, Any]:
    """Merge the LoRA adapter at ``adapter`` into ``base`` and write the float checkpoint ``out``
    (written to a temporary folder, renamed when complete). Returns the marker."""
    import torch

    base, adapter, out = Path(base).expanduser(), Path(adapter).expanduser(), Path(out).expanduser()
    if not (adapter / ADAPTER_CONFIG).is_file():
        raise UsageError(f"{adapter} has no {ADAPTER_CONFIG}; pass a PEFT adapter folder (adapter.save_pretrained)")
    if not base.is_dir() or not (base / "config.json").is_file():
        raise UsageError(f"{base} is no model folder with config.json; pass the fp16/bf16 base the adapter was "
                         "trained on")
    found = quantized_input(base)
    if found is not None:
        raise AlreadyQuantizedError(f"{found[0]}: merging onto quantized weights adds a float update to rounded "
                                    "weights that are then rounded again; merge onto the fp16/bf16 base"
                                    f"{found[1]}, then quantize the merged checkpoint")
    earlier = merge_marker(base)
    if earlier is not None:
        raise UsageError(f"{base} already has adapter {earlier.get('adapter', '?')} merged into it (its {MARKER}); "
                         f"a second merge adds onto merged weights: merge every adapter into the original base "
                         f"{earlier.get('base', '')} instead")
    if out.exists() and not overwrite:
        raise UsageError(f"{out} already exists; pass --overwrite or choose another --out")
    try:
        from peft import PeftModel
    except ImportError:
        raise UsageError("qf merge uses peft to read adapters: pip install peft") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((base / "config.json").read_text())
    stored = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    name = dtype or stored
    if name not in ("float16", "bfloat16", "float32"):
        raise UsageError(f"--dtype {name!r}: choose float16, bfloat16 or float32")
    torch_dtype = getattr(torch, name)
    adapter_config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    if adapter_config.get("peft_type", "LORA") not in ("LORA",):
        raise UsageError(f"{adapter} is a {adapter_config.get('peft_type')} adapter; qf merge merges LoRA adapters")
    weight_files = sorted(base.glob("*.safetensors"))
    adapter_files = sorted(adapter.glob("adapter_model*.safetensors")) or sorted(adapter.glob("adapter_model*.bin"))
    if not adapter_files:
        raise UsageError(f"{adapter} has no adapter_model.safetensors")
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32,
                                                     trust_remote_code=trust_remote_code)
        merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        merged.to(torch_dtype).save_pretrained(str(tmp), safe_serialization=True)
        try:
            AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(tmp))
        except Exception:  # a base without tokenizer files: the weights are what matters
            pass
        marker = {"base": str(base.resolve()), "base_sha256": _files_sha256(weight_files),
                  "adapter": str(adapter.resolve()), "adapter_sha256": _files_sha256(adapter_files),
                  "adapter_base": adapter_config.get("base_model_name_or_path"),
                  "rank": adapter_config.get("r"), "alpha": adapter_config.get("lora_alpha"),
                  "targets": adapter_config.get("target_modules"), "dtype": name,
                  "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}
        write_json_atomic(tmp / MARKER, marker)
    except (UsageError, ModelLoadError):
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot merge {adapter} into {base}: {first}") from None
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return marker

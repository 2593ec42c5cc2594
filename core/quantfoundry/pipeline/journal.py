"""The block journal: every finished block of a run, kept on disk so that a killed run resumes.

A run that writes an artifact keeps, beside ``--out``, a folder
``.<out name>.partial-<fingerprint>/`` (deterministic: the fingerprint hashes the run's inputs):

* ``journal.json`` — the inputs (model files, stages and options, format, exporter, calibration,
  dtype, device, versions) and their fingerprint;
* ``lock`` — the process id of the run writing it;
* ``block-00000.safetensors`` … — one file per finished block, written to a temporary name and
  renamed, so a file that exists is complete: every tensor the exporter will get for the block
  (quantized weights as codes + grid parameters, float tensors as they are in memory), the
  importance collected for it, and in the metadata the write order and the notes it added.

The exporter streams from the journal once the last block is done, so an interrupted run has
written no artifact, and a resumed one (``--resume``) restores blocks ``0 … k−1`` from it and
quantizes from block ``k`` — the artifact is byte-identical to an uninterrupted run's. The
folder is deleted when the artifact is in place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError
from ..formats import format_from_json
from ..roles.activation import ActQuant
from ..roles.format import QuantizedWeight
from ..roles.weight_transform import transform_from_stored

Entry = tuple[str, "torch.Tensor | QuantizedWeight"]


@dataclass
class BlockRecord:
    """What one finished block gave the run."""

    entries: list[Entry]
    notes: list[str] = field(default_factory=list)
    importance: dict[str, torch.Tensor] = field(default_factory=dict)
    #: tensors the artifact must hold that are no parameter of the model (block extras: the KV
    #: cache's ``k_scale``/``v_scale``), by full name, written as they are
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def quantized(self) -> dict[str, QuantizedWeight]:
        return {n: t for n, t in self.entries if isinstance(t, QuantizedWeight)}


def fingerprint(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def pid_alive(pid: int) -> bool:
    """True if a process with this id exists (on this machine)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class Journal:
    """The journal folder of one run (see the module docstring)."""

    def __init__(self, folder: Path, inputs: dict[str, Any]):
        self.folder = Path(folder)
        self.inputs = inputs
        self.fingerprint = fingerprint(inputs)

    # -- finding -------------------------------------------------------------------------
    @staticmethod
    def prefix(out: Path) -> str:
        return f".{out.name}.partial-"

    @classmethod
    def for_output(cls, out: Path, inputs: dict[str, Any]) -> Journal:
        """The journal this run's inputs name, beside ``out`` (not created yet)."""
        return cls(out.parent / f"{cls.prefix(out)}{fingerprint(inputs)}", inputs)

    @classmethod
    def others(cls, out: Path, keep: Path | None = None) -> list[Path]:
        """Journal folders of earlier runs to ``out`` with other inputs."""
        if not out.parent.is_dir():
            return []
        return sorted(p for p in out.parent.glob(f"{cls.prefix(out)}*") if p.is_dir() and p != keep)

    def exists(self) -> bool:
        return (self.folder / "journal.json").is_file()

    def finished(self) -> int:
        """How many blocks, from block 0 on, are recorded."""
        n = 0
        while (self.folder / self._block_file(n)).is_file():
            n += 1
        return n

    def writer_pid(self) -> int | None:
        """The process id in ``lock`` if that process is alive (another run writing here)."""
        try:
            pid = int((self.folder / "lock").read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if pid != os.getpid() and pid_alive(pid) else None

    @staticmethod
    def difference(old: dict[str, Any], new: dict[str, Any]) -> str:
        """The first input that differs, for the refusal to resume."""
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                a, b = (_short(json.dumps(d.get(key), default=str)) for d in (old, new))
                return f"{key} changed (journal: {a}; now: {b})"
        return "nothing differs"

    # -- writing -------------------------------------------------------------------------
    def start(self, *, fresh: bool) -> None:
        """Create (or, with ``fresh``, empty and re-create) the folder and take the lock."""
        if fresh and self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "lock").write_text(f"{os.getpid()}\n")
        if not self.exists():
            tmp = self.folder / ".journal.json.tmp"
            tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "inputs": self.inputs}, indent=2,
                                      default=str) + "\n")
            tmp.replace(self.folder / "journal.json")

    def recorded_inputs(self) -> dict[str, Any]:
        return dict(json.loads((self.folder / "journal.json").read_text()).get("inputs", {}))

    def write_block(self, index: int, record: BlockRecord) -> None:
        self._write(self._block_file(index), record)

    def write_model(self, record: BlockRecord) -> None:
        """The record of a whole-model quantizer (one entry for the whole model)."""
        self._write("model.safetensors", record)

    def _write(self, name: str, record: BlockRecord) -> None:
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        order: list[dict[str, Any]] = []
        for i, (key, value) in enumerate(record.entries):
            if isinstance(value, QuantizedWeight):
                tensors[f"{i}.packed"] = value.packed
                tensors.update({f"{i}.p.{k}": v for k, v in value.params.items()})
                tensors.update({f"{i}.tp.{k}": v for k, v in value.tensor_params.items()})
                if value.perm is not None:
                    tensors[f"{i}.perm"] = value.perm
                if value.input_scale is not None:
                    tensors[f"{i}.input_scale"] = value.input_scale
                for t_i, t in enumerate(value.transforms):
                    tensors.update({f"{i}.tf{t_i}.{k}": v for k, v in t.tensors().items()})
                order.append({"name": key, "format": value.format.to_json(), "shape": list(value.shape),
                              "dtype": _dtype_name(value.dtype), "params": list(value.params),
                              "perm": value.perm is not None, "meta": value.meta,
                              "tensor_params": list(value.tensor_params),
                              "input_quant": None if value.input_quant is None else value.input_quant.to_json(),
                              "transforms": [{"info": t.to_json(), "tensors": list(t.tensors())}
                                             for t in value.transforms]})
            else:
                tensors[f"{i}.t"] = value
                order.append({"name": key})
        for j, value in enumerate(record.importance.values()):
            tensors[f"imp{j}"] = value
        for j, value in enumerate(record.extras.values()):
            tensors[f"x{j}"] = value
        meta = {"order": order, "notes": record.notes, "importance": list(record.importance),
                "extras": list(record.extras)}
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        tmp = self.folder / f".{name}.tmp"
        save_file(tensors, str(tmp), metadata={"record": json.dumps(meta, default=str)})
        tmp.replace(self.folder / name)

    # -- reading -------------------------------------------------------------------------
    def read_block(self, index: int) -> BlockRecord:
        return self._read(self._block_file(index))

    def read_model(self) -> BlockRecord:
        return self._read("model.safetensors")

    def blocks(self, n: int) -> Iterator[BlockRecord]:
        for i in range(n):
            yield self.read_block(i)

    def _read(self, name: str) -> BlockRecord:
        from safetensors import safe_open

        path = self.folder / name
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["record"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:
            raise UsageError(f"the journal file {path} cannot be read ({type(exc).__name__}); "
                             "rerun without --resume to start over") from None
        entries: list[Entry] = []
        for i, item in enumerate(meta["order"]):
            if "format" in item:
                entries.append((item["name"], QuantizedWeight(
                    format_from_json(item["format"]), tuple(item["shape"]), getattr(torch, item["dtype"]),
                    tensors[f"{i}.packed"], {k: tensors[f"{i}.p.{k}"] for k in item["params"]},
                    tensors[f"{i}.perm"] if item["perm"] else None, dict(item.get("meta") or {}),
                    {k: tensors[f"{i}.tp.{k}"] for k in item.get("tensor_params", [])},
                    ActQuant.from_json(item["input_quant"]) if item.get("input_quant") else None,
                    tensors.get(f"{i}.input_scale"),
                    tuple(transform_from_stored(t["info"], {k: tensors[f"{i}.tf{t_i}.{k}"] for k in t["tensors"]})
                          for t_i, t in enumerate(item.get("transforms", []))))))
            else:
                entries.append((item["name"], tensors[f"{i}.t"]))
        importance = {n: tensors[f"imp{j}"] for j, n in enumerate(meta.get("importance", []))}
        extras = {n: tensors[f"x{j}"] for j, n in enumerate(meta.get("extras", []))}
        return BlockRecord(entries, list(meta.get("notes", [])), importance, extras)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    @staticmethod
    def _block_file(index: int) -> str:
        return f"block-{index:05d}.safetensors"


def _short(text: str) -> str:
    return text if len(text) <= 80 else text[:77] + "..."


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")

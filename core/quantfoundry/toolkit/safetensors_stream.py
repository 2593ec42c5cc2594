"""A streaming safetensors writer: tensors are appended one at a time, so writing an artifact
never holds more than one tensor in memory.

The safetensors layout is an 8-byte little-endian header length, a JSON header (name →
dtype, shape, data_offsets; ``__metadata__``) padded with spaces to a multiple of 8, then
the tensors' bytes back to back. The header must come first but is only known at the end,
so data goes to a temporary sibling file first and is copied behind the header on close.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import torch

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


class StreamingSafetensorsWriter:
    """``add(name, tensor)`` as tensors arrive, then ``close(metadata)``; or ``abort()``."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._data_path = self.path.with_name(f".{self.path.name}.data")
        self._data = open(self._data_path, "wb")  # noqa: SIM115 - closed in close()/abort()
        self._header: dict[str, dict[str, object]] = {}
        self._offset = 0

    @property
    def nbytes(self) -> int:
        return self._offset

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._header:
            raise ValueError(f"tensor {name} added twice to {self.path.name}")
        if tensor.dtype not in _DTYPES:
            raise TypeError(f"safetensors cannot store dtype {tensor.dtype} ({name})")
        t = tensor.detach().to("cpu").contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        self._data.write(memoryview(raw) if t.numel() else raw)
        n = t.numel() * t.element_size()
        self._header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [self._offset, self._offset + n]}
        self._offset += n

    def close(self, metadata: dict[str, str] | None = None) -> None:
        self._data.close()
        header = dict(self._header)
        if metadata:
            header["__metadata__"] = dict(metadata)
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * ((-len(blob)) % 8)
        with open(self.path, "wb") as out, open(self._data_path, "rb") as data:
            out.write(struct.pack("<Q", len(blob)))
            out.write(blob)
            shutil.copyfileobj(data, out, length=1 << 24)
        os.unlink(self._data_path)

    def abort(self) -> None:
        self._data.close()
        for p in (self._data_path, self.path):
            if p.exists():
                p.unlink()


class ShardedSafetensorsWriter:
    """Tensors streamed into ``shard-NNNNN.safetensors`` files of about ``shard_mb`` each;
    :meth:`finish` names them as Hugging Face does (``model.safetensors``, or
    ``model-0000k-of-0000n.safetensors`` with ``model.safetensors.index.json``) and returns the
    file names. Exporters of safetensors checkpoints share it."""

    def __init__(self, folder: Path, shard_mb: int = 4096):
        self.folder = Path(folder)
        self.shard_bytes = shard_mb * (1 << 20)
        self._shards: list[tuple[Path, list[str]]] = []
        self._writer: StreamingSafetensorsWriter | None = None
        self._keys: list[str] = []
        self.names: set[str] = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.names:
            raise ValueError(f"tensor {name} written twice")
        self.names.add(name)
        if self._writer is not None and self._writer.nbytes >= self.shard_bytes:
            self._close_shard()
        if self._writer is None:
            self._writer = StreamingSafetensorsWriter(self.folder / f"shard-{len(self._shards):05d}.safetensors")
        self._writer.add(name, tensor)
        self._keys.append(name)

    def _close_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close({"format": "pt"})
        self._shards.append((self._writer.path, self._keys))
        self._writer, self._keys = None, []

    def finish(self) -> list[str]:
        self._close_shard()
        n = len(self._shards)
        weight_map: dict[str, str] = {}
        for i, (path, keys) in enumerate(self._shards):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.rename(self.folder / final)
            weight_map.update({k: final for k in keys})
        if n > 1:
            (self.folder / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
        return sorted(set(weight_map.values()))

"""llama.cpp importance-matrix files: the GGUF-based format and the legacy ``.dat``
(``docs/llama-cpp-reference.md`` §5; ``tools/imatrix/imatrix.cpp``, ``common/imatrix-loader.cpp``).

An entry is keyed by the GGUF weight name (``blk.3.ffn_down.weight``) and holds, per matrix
(one for a dense weight, one per expert for MoE), the raw sum of squared activations per input
column (``in_sum2``) and the number of activation rows summed (``counts``). The importance the
encoders use is ``in_sum2 / counts`` (1.0 where a count is 0), exactly as ``llama-quantize``
computes it.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from quantfoundry.errors import ArtifactError

GGUF_MAGIC = b"GGUF"


@dataclass
class ImatrixEntry:
    in_sum2: np.ndarray  # float32 [n_mat, ne0]
    counts: np.ndarray   # float32 [n_mat]

    @classmethod
    def of_experts(cls, means: list[torch.Tensor | None], tokens: int) -> ImatrixEntry:
        """A stacked tensor's entry from each expert's column means over ``tokens`` rows (the run's
        calibration tokens: the counts are not the tokens routed to each expert, the means are
        exact); an expert without statistics (``None``) gets a count of 0, which llama.cpp reads as
        an importance of 1.0."""
        width = next(m.numel() for m in means if m is not None)
        sums = np.zeros((len(means), width), dtype=np.float32)
        counts = np.zeros(len(means), dtype=np.float32)
        for e, m in enumerate(means):
            if m is not None:
                sums[e] = (m.detach().double().cpu().numpy() * tokens).astype(np.float32)
                counts[e] = tokens
        return cls(sums, counts)

    def importance(self) -> torch.Tensor:
        """Mean squared activation per input column, ``[n_mat * ne0]`` float32."""
        counts = self.counts.astype(np.float32)[:, None]
        safe = np.where(counts == 0, np.float32(1), counts)
        imp = np.where(counts == 0, np.float32(1), self.in_sum2 / safe).astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(imp.reshape(-1)))


@dataclass
class Imatrix:
    """An importance matrix: entries by GGUF tensor name, plus the provenance llama.cpp records."""

    entries: dict[str, ImatrixEntry] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def importance(self, name: str) -> torch.Tensor | None:
        entry = self.entries.get(name)
        return None if entry is None else entry.importance()

    @classmethod
    def from_means(cls, means: dict[str, torch.Tensor], tokens: int, *, dataset: str = "", chunk_size: int = 0,
                   chunk_count: int = 0) -> Imatrix:
        """Build from per-column means over ``tokens`` activation rows (what the core collects)."""
        entries = {name: ImatrixEntry((m.detach().double().cpu().numpy() * tokens).astype(np.float32)[None, :],
                                      np.array([tokens], dtype=np.float32))
                   for name, m in means.items()}
        return cls(entries, [dataset] if dataset else [], chunk_count, chunk_size)


def read_imatrix(path: str | os.PathLike[str]) -> Imatrix:
    """Read a GGUF imatrix or a legacy ``.dat`` one; a damaged file is a one-line error."""
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"imatrix file {p} does not exist")
    with open(p, "rb") as f:
        magic = f.read(4)
    try:
        return _read_gguf(p) if magic == GGUF_MAGIC else _read_dat(p)
    except ArtifactError:
        raise
    except Exception as exc:  # a truncated or foreign file: never a traceback from the parser
        raise ArtifactError(f"{p} is not a readable llama.cpp imatrix ({type(exc).__name__}: {exc}); "
                            "regenerate it with llama-imatrix or qf") from None


def _read_gguf(p: Path) -> Imatrix:
    from gguf import GGUFReader

    reader = GGUFReader(str(p))
    fields = reader.fields
    for key in ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"):
        if key not in fields:
            raise ArtifactError(f"{p} lacks the key {key!r} that llama-quantize requires of a GGUF imatrix")
    datasets = [bytes(fields["imatrix.datasets"].parts[i]).decode("utf-8") for i in fields["imatrix.datasets"].data]
    chunk_count = int(fields["imatrix.chunk_count"].parts[-1][0])
    chunk_size = int(fields["imatrix.chunk_size"].parts[-1][0])
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        data = np.asarray(t.data, dtype=np.float32)
        if t.name.endswith(".in_sum2"):
            sums[t.name.removesuffix(".in_sum2")] = data.reshape(-1, int(t.shape[0]))
        elif t.name.endswith(".counts"):
            counts[t.name.removesuffix(".counts")] = data.reshape(-1)
    if set(sums) != set(counts):
        missing = sorted(set(sums) ^ set(counts))[:3]
        raise ArtifactError(f"{p}: in_sum2 and counts do not pair up (e.g. {', '.join(missing)})")
    entries = {n: ImatrixEntry(sums[n], np.round(counts[n]).astype(np.float32)) for n in sorted(sums)}
    return Imatrix(entries, datasets, chunk_count, chunk_size)


def _read_dat(p: Path) -> Imatrix:
    raw = p.read_bytes()
    pos = 0

    def take(fmt: str) -> tuple:
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(raw):
            raise ArtifactError(f"{p} is truncated (at byte {pos} of {len(raw)}); regenerate the imatrix")
        out = struct.unpack_from(fmt, raw, pos)
        pos += size
        return out

    (n_entries,) = take("<i")
    if n_entries < 0 or n_entries > 1_000_000:
        raise ArtifactError(f"{p} is neither a GGUF nor a legacy .dat imatrix (entry count {n_entries})")
    entries: dict[str, ImatrixEntry] = {}
    for _ in range(n_entries):
        (length,) = take("<i")
        name = bytes(take(f"<{length}s")[0]).decode("utf-8")
        ncall, nval = take("<ii")
        if nval < 0 or pos + 4 * nval > len(raw):
            raise ArtifactError(f"{p} is truncated inside entry {name!r}; regenerate the imatrix")
        values = np.frombuffer(raw, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += 4 * nval
        # legacy values are means × ncall; llama-quantize divides by ncall
        means = values / np.float32(ncall) if ncall > 0 else values
        entries[name] = ImatrixEntry(means[None, :].astype(np.float32), np.ones(1, dtype=np.float32))
    chunk_count, datasets = 0, []
    if pos + 8 <= len(raw):
        (chunk_count,) = take("<i")
        (length,) = take("<i")
        datasets = [bytes(take(f"<{length}s")[0]).decode("utf-8")]
    return Imatrix(dict(sorted(entries.items())), datasets, chunk_count, 0)


def write_imatrix(imatrix: Imatrix, path: str | os.PathLike[str], *, fmt: str = "gguf") -> Path:
    """Write ``imatrix`` as llama.cpp does (``fmt``: ``gguf`` or ``dat``), via a temporary file."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    try:
        if fmt == "gguf":
            _write_gguf(imatrix, tmp)
        elif fmt == "dat":
            _write_dat(imatrix, tmp)
        else:
            raise ValueError(f"imatrix format must be gguf or dat, got {fmt!r}")
        read_imatrix(tmp)  # verify before it takes the real name
        tmp.replace(p)
    finally:
        tmp.unlink(missing_ok=True)
    return p


def _write_gguf(imatrix: Imatrix, path: Path) -> None:
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), arch="imatrix")
    w.kv_data[0].pop("general.architecture", None)  # llama-imatrix writes general.type only
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", list(imatrix.datasets))
    w.add_uint32("imatrix.chunk_count", int(imatrix.chunk_count))
    w.add_uint32("imatrix.chunk_size", int(imatrix.chunk_size))
    for name in sorted(imatrix.entries):
        e = imatrix.entries[name]
        w.add_tensor(f"{name}.in_sum2", np.ascontiguousarray(e.in_sum2, dtype=np.float32))
        w.add_tensor(f"{name}.counts", np.ascontiguousarray(e.counts.reshape(-1, 1), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _write_dat(imatrix: Imatrix, path: Path) -> None:
    chunk = max(imatrix.chunk_size, 1)
    out = bytearray()
    kept = {n: e for n, e in sorted(imatrix.entries.items()) if float(e.counts.max()) > 0}
    out += struct.pack("<i", len(kept))
    for name, e in kept.items():
        ncall = max(1, math.ceil(float(e.counts.max()) / chunk))
        counts = e.counts.astype(np.float32)[:, None]
        means = np.where(counts == 0, np.float32(1), e.in_sum2 / np.where(counts == 0, np.float32(1), counts))
        values = (means * np.float32(ncall)).astype("<f4").reshape(-1)
        encoded = name.encode("utf-8")
        out += struct.pack("<i", len(encoded)) + encoded + struct.pack("<ii", ncall, values.size) + values.tobytes()
    dataset = (imatrix.datasets[0] if imatrix.datasets else "").encode("utf-8")
    out += struct.pack("<i", int(imatrix.chunk_count)) + struct.pack("<i", len(dataset)) + dataset
    path.write_bytes(bytes(out))

"""Runs across processes (one per GPU) on ``torch.distributed``.

Every process walks the same blocks in lockstep with its share of the calibration batches
(batch ``i`` on rank ``i mod world``). What a quantizer measures goes through the toolkit's
collectors, which reduce across ranks (sums in float64, maxima, token counts), so every rank
holds the statistics of the whole calibration set; work that needs no other rank's data (each
Hessian's column loop) is split by :func:`split_work`, each item computed on the rank that owns
it and broadcast to the rest. Rank 0 alone writes the journal and the artifact, and evaluates.

With one process (no process group) every function here is the identity: the single-device
run is the same code.

Processes start either under ``torchrun --nproc-per-node N -m quantfoundry run ...`` (the
environment names rank and world) or from ``qf run --devices cuda:0,cuda:1``, whose process
becomes rank 0 and starts one worker per other device (``quantfoundry.pipeline.processes``).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

import torch

T = TypeVar("T")
K = TypeVar("K")

#: the environment variable :func:`launch` sets to the backend every rank uses
BACKEND_ENV = "QF_DIST_BACKEND"

#: how long a collective waits for a rank that died or hangs before the run fails
TIMEOUT = timedelta(minutes=30)


def _dist() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def world_size() -> int:
    """Processes in the run (1 without a process group)."""
    dist = _dist()
    return int(dist.get_world_size()) if dist is not None else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    dist = _dist()
    return int(dist.get_rank()) if dist is not None else 0


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of ``items``: every ``world``-th one, from its rank."""
    return list(items[rank()::world_size()])


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce ``t`` in place across ranks (``"sum"`` or ``"max"``); returns it."""
    dist = _dist()
    if dist is None:
        return t
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
    nccl = dist.get_backend() == "nccl"
    if (t.device.type == "cuda") == nccl:
        dist.all_reduce(t, op=ops[op])
        return t
    # NCCL reduces GPU memory only, gloo host memory here (two processes sharing one GPU)
    moved = t.to(torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu"))
    dist.all_reduce(moved, op=ops[op])
    t.copy_(moved)
    return t


def all_reduce_count(n: int) -> int:
    """The sum of an integer over ranks."""
    if _dist() is None:
        return n
    return int(all_reduce_(torch.tensor([n], dtype=torch.int64)).item())


def merge_dicts(d: dict[K, T]) -> dict[K, T]:
    """The union of every rank's ``d`` (ranks must agree where their keys meet); ``d`` itself
    with one process."""
    dist = _dist()
    if dist is None:
        return d
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, d)
    out: dict[K, T] = {}
    for part in parts:
        out.update(part)
    return out


def broadcast_object(obj: T, src: int) -> T:
    """``obj`` from rank ``src`` on every rank (tensors inside come back on the CPU)."""
    dist = _dist()
    if dist is None:
        return obj
    box = [_to_cpu(obj) if rank() == src else None]
    dist.broadcast_object_list(box, src=src, device=_object_device())
    return box[0]  # type: ignore[return-value]


def split_work(keys: Sequence[K], compute: Callable[[K], T], *, notes: list[str] | None = None) -> dict[K, T]:
    """``compute(key)`` for every key, each computed once, on the rank that owns it (key ``i``
    on rank ``i mod world``), and the results handed to every rank (tensors on the CPU; move
    them where they are used). ``compute`` must depend only on data every rank holds.

    :param notes: the run's notes (``QuantContext.notes``): what ``compute`` appends there is
        carried to every rank and appended in key order, as a one-process run appends it. An
        exception ``compute`` raises is raised on every rank."""
    world = world_size()
    if world == 1:
        return {k: compute(k) for k in keys}
    mine: dict[K, tuple[Any, list[str], BaseException | None]] = {}
    for i, k in enumerate(keys):
        if i % world != rank():
            continue
        start = len(notes) if notes is not None else 0
        try:
            value, error = _to_cpu(compute(k)), None
        except Exception as exc:  # noqa: BLE001 - raised on every rank below
            value, error = None, exc
        added = list(notes[start:]) if notes is not None else []
        if notes is not None:
            del notes[start:]
        mine[k] = (value, added, error)
    got: dict[K, tuple[Any, list[str], BaseException | None]] = {}
    for src in range(world):
        got.update(broadcast_object(mine if src == rank() else None, src) or {})
    out: dict[K, T] = {}
    for k in keys:
        value, added, error = got[k]
        if notes is not None:
            notes.extend(added)
        if error is not None:
            raise error
        out[k] = value
    return out


def _object_device() -> torch.device | None:
    dist = _dist()
    if dist is not None and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return None


def _to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor it holds (in dicts, lists, tuples, dataclasses) on the CPU."""
    from dataclasses import fields, is_dataclass, replace

    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    if is_dataclass(obj) and not isinstance(obj, type):
        to = getattr(obj, "to", None)
        if callable(to):  # QuantizedWeight: its own move, transforms included
            return to("cpu")
        return replace(obj, **{f.name: _to_cpu(getattr(obj, f.name)) for f in fields(obj) if f.init})
    return obj


# -- starting the processes ---------------------------------------------------------------------

def parse_devices(devices: str | Sequence[str]) -> list[torch.device]:
    """``cuda:0,cuda:1`` (or ``cpu,cpu``: processes on the CPU, gloo) → devices; one kind only.
    A GPU named twice (``cuda:0,cuda:0``) runs two processes on it over gloo: for checking a
    multi-process run on one GPU, not for speed."""
    from .errors import UsageError

    items = [d.strip() for d in (devices.split(",") if isinstance(devices, str) else devices) if d.strip()]
    if len(items) < 2:
        raise UsageError(f"--devices takes two or more devices (cuda:0,cuda:1), got {devices!r}; for one, "
                         "use --device")
    try:
        out = [torch.device(d) for d in items]
    except RuntimeError:
        raise UsageError(f"--devices {devices!r}: write devices as cuda:0,cuda:1 (or cpu,cpu)") from None
    kinds = {d.type for d in out}
    if len(kinds) != 1 or next(iter(kinds)) not in ("cuda", "cpu"):
        raise UsageError(f"--devices {devices!r}: all CUDA devices (cuda:0,cuda:1) or all cpu")
    if out[0].type == "cuda":
        out = [torch.device("cuda", d.index if d.index is not None else 0) for d in out]
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        missing = [str(d) for d in out if d.index >= count]
        if missing:
            raise UsageError(f"--devices names {', '.join(missing)}, but this machine has {count} CUDA device(s)")
    return out


def env_world() -> int:
    """The world size ``torchrun`` set for this process (1 when not started by it)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def env_rank() -> int:
    """The rank ``torchrun`` (or :func:`launch`) set for this process (0 when none)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """Join the process group the environment describes (``torchrun``'s, or :func:`launch`'s),
    for ``device`` (NCCL on CUDA, gloo on the CPU); leave it at the end. Does nothing when a
    group exists already or the world is one process."""
    import torch.distributed as dist

    if dist.is_initialized() or env_world() <= 1:
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = os.environ.get(BACKEND_ENV) or ("nccl" if device.type == "cuda" else "gloo")
    kwargs: dict[str, Any] = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, timeout=TIMEOUT, **kwargs)
    try:
        yield
    finally:
        dist.destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """Under ``torchrun`` with ``--device cuda``: this rank's GPU (``cuda:LOCAL_RANK``)."""
    if env_world() > 1 and device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device

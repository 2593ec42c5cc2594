"""Starting the processes of a run across devices (``--devices``) and watching them: this
process becomes rank 0, one worker per other device (:mod:`quantfoundry.distributed` has the
collectives they share)."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from typing import Any

import torch

from ..distributed import BACKEND_ENV, free_port
from ..errors import QFError


def join_group(rank: int, world: int, port: int) -> None:
    """A worker's environment, as :func:`launch` gives rank 0's."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})


def launch(devices: list[torch.device], target: Callable[..., None], model: Any,
           options: dict[str, Any]) -> list[Any]:
    """Start ranks 1… (one process per device after the first), each running
    ``target(rank, world, port, model, options)`` with ``options`` for its device, and set this
    process's environment as rank 0's; returns the worker processes (join them after the run)."""
    import multiprocessing

    port = free_port()
    world = len(devices)
    # NCCL needs a GPU per process; GPUs named twice (a check on one GPU) or the CPU: gloo
    cuda = devices[0].type == "cuda"
    backend = "nccl" if cuda and len({d.index for d in devices}) == world else "gloo"
    ctx = multiprocessing.get_context("spawn")
    procs = []
    for r in range(1, world):
        opts = {**options, "device": str(devices[r]), "progress": False, "report": None}
        os.environ[BACKEND_ENV] = backend  # inherited by the worker
        p = ctx.Process(target=target, args=(r, world, port, model, opts), name=f"qf-rank{r}", daemon=True)
        p.start()
        procs.append(p)
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), BACKEND_ENV: backend})
    return procs


class Watchdog:
    """Watches the workers :func:`launch` started: one that dies with an error while rank 0
    runs leaves rank 0 waiting in a collective, so after saying so the watchdog ends this
    process (exit status 1) once ``grace`` seconds pass without the run finishing."""

    def __init__(self, workers: list[Any], grace: float = 30.0):
        self.workers = workers
        self.grace = grace
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="qf-watchdog", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._done.wait(1.0):
            dead = [p for p in self.workers if p.exitcode not in (None, 0)]
            if dead:
                print(f"qf: worker {dead[0].name} failed (exit status {dead[0].exitcode}); the run cannot go on "
                      "without it", file=sys.stderr)
                if not self._done.wait(self.grace):
                    os._exit(1)
                return

    def join(self) -> None:
        """Wait for every worker to finish; a failed one is an error."""
        for p in self.workers:
            p.join()
        bad = [p for p in self.workers if p.exitcode != 0]
        if bad:
            raise QFError(f"worker {bad[0].name} ended with exit status {bad[0].exitcode}")

    def stop(self) -> None:
        self._done.set()
        for p in self.workers:
            if p.is_alive():
                p.join(timeout=10)
            if p.is_alive():
                p.terminate()

"""Opening a run's block journal: its inputs (what the artifact depends on), resuming one with
the same inputs, refusing one with other inputs, and replacing journals no live run writes."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError
from ..files import sha256_file
from ..model.source import ModelSource
from ..options import options_to_dict
from .journal import Journal
from .manifest import plugin_versions
from .state import RunState, loaded


def journal_inputs(state: RunState) -> dict[str, Any]:
    """What the artifact depends on: a journal written with other inputs cannot be resumed."""
    source, _ = loaded(state)
    r = state.request
    files = sorted(set(source.weight_map.values()))
    cal = state.calibration
    return {
        "model": {"path": str(Path(source.path).resolve()), "config": _sha_config(source),
                  "weights": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]},
        "stages": [[n, options_to_dict(s.options)] for (n, _), s in
                   zip(state.stage_specs, [*state.transforms, state.quantizer], strict=True)],
        "format": state.requested.to_json() if state.requested is not None else None,
        "exporter": [state.exporter.name, options_to_dict(state.exporter.options)],
        "files": _option_files([*state.transforms, state.quantizer, state.exporter]),
        "calibration": None if cal is None else [cal.sha256, cal.ids_sha256],
        "plan": state.plan.to_json() if state.plan is not None else None,
        "run": {"dtype": r.dtype, "device": state.device.type, "batch_size": r.batch_size, "imatrix": r.imatrix},
        "versions": {"torch": torch.__version__, "plugins": plugin_versions()},
    }


def _sha_config(source: ModelSource) -> str:
    return sha256_file(Path(source.path) / "config.json")


def _option_files(components: list[Any]) -> dict[str, str]:
    """SHA-256 of every file a component's options name (an imatrix, a chat template...)."""
    out: dict[str, str] = {}
    for comp in components:
        for f in dataclasses.fields(comp.options):
            value = getattr(comp.options, f.name)
            if isinstance(value, Path) and value.is_file():
                out[f"{comp.name}.{f.name}"] = sha256_file(value)
    return out


def open_journal(state: RunState) -> Journal:
    """This run's journal: resumed (``--resume``, same inputs), or started afresh."""
    out = state.out
    if out is None:  # pragma: no cover - callers check
        raise RuntimeError("a journal needs an output folder")
    journal = Journal.for_output(out, journal_inputs(state))
    others = Journal.others(out, keep=journal.folder)
    for folder in [journal.folder, *others]:
        pid = Journal(folder, {}).writer_pid() if folder.exists() else None
        if pid is not None:
            raise UsageError(f"another run (pid {pid}) is writing {out}; wait for it or choose another --out")
    done = journal.finished() if journal.exists() else 0
    if state.request.resume:
        if not journal.exists():
            if others:
                old = Journal(others[-1], {})
                reason = Journal.difference(old.recorded_inputs(), journal.inputs) if old.exists() else "unreadable"
                raise UsageError(f"cannot resume: the journal {others[-1].name} was written by a run with other "
                                 f"inputs: {reason}; rerun without --resume to start over")
            raise UsageError(f"cannot resume: no journal of an interrupted run to {out} (looked for "
                             f"{journal.folder.name}); rerun without --resume")
        state.resumed_from = done
        journal.start(fresh=False)
        state.say(f"resuming from the journal {journal.folder.name}: {done} finished block(s) restored, "
                  f"quantizing from block {done}")
        return journal
    if done:
        state.say(f"a resumable journal of an interrupted run to {out} exists ({done} finished block(s) in "
                  f"{journal.folder.name}); starting over — pass --resume to continue it instead")
    for folder in others:
        state.say(f"replacing {folder.name}, the journal of an interrupted run with other inputs")
        Journal(folder, {}).remove()
    journal.start(fresh=True)
    return journal

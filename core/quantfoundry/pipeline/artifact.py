"""Putting an artifact folder in place: a temporary sibling, verified, then renamed.

* The exporter writes into ``.<out name>.tmp-<pid>`` beside ``--out``; it becomes ``--out`` only
  after :meth:`~quantfoundry.Exporter.verify` passed, so a failed or killed run never leaves a
  half-written artifact under the real name.
* With ``--overwrite`` the old artifact is moved aside (``.<out name>.old-<pid>``), the new one
  renamed in, and only then is the old one deleted: at every moment one complete artifact exists.
* Leftovers of dead runs (a temporary folder, or an old artifact moved aside, whose process no
  longer exists) are found when the next run to the same ``--out`` starts: a temporary folder
  is deleted, an old artifact put back if nothing took its place.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from pathlib import Path

from ..errors import QFError, UsageError
from .journal import pid_alive

_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)$")


def temp_folder(out: Path) -> Path:
    """A fresh, empty temporary sibling of ``out`` owned by this process."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def clean_dead_runs(out: Path) -> list[str]:
    """Remove the temporary folders of dead runs to ``out`` (and put back an old artifact a
    dead ``--overwrite`` moved aside); returns one line per thing done."""
    done: list[str] = []
    if not out.parent.is_dir():
        return done
    for path in sorted(out.parent.iterdir()):
        m = _LEFTOVER.match(path.name)
        if m is None or m["name"] != out.name or not path.is_dir():
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or pid_alive(pid):
            continue
        if m["kind"] == "old" and not out.exists():
            path.rename(out)
            done.append(f"put back {out}, which a dead run (pid {pid}) had moved aside to replace it")
        else:
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed {path.name}, left by a dead run (pid {pid})")
    return done


def publish(tmp: Path, out: Path) -> None:
    """Rename the verified ``tmp`` to ``out``; an existing ``out`` is deleted only afterwards."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old is not None and not out.exists():
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class OutputDiskError(QFError):
    """The output disk refused a write (full, read-only, no permission)."""


def _existing_ancestor(out: Path) -> Path:
    here = out.absolute()
    while not here.exists() and here != here.parent:
        here = here.parent
    return here


def check_writable(out: Path) -> None:
    """Refuse, before any work, an ``--out`` whose folder cannot be created or written to."""
    base = _existing_ancestor(out)
    if not base.is_dir():
        raise UsageError(f"cannot write {out}: {base} is a file, not a folder; choose another --out")
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as exc:
        raise UsageError(f"cannot write {out}: {base} is not writable ({exc.strerror}); "
                         "choose another --out") from None


def check_free_space(out: Path, need: int) -> None:
    """Refuse, before any work, a disk without room for the journal and the artifact (``need``
    bytes, an estimate from the plan)."""
    free = shutil.disk_usage(_existing_ancestor(out)).free
    if free < need:
        raise UsageError(f"the disk of {out} has {free / 2**20:,.0f} MiB free, the run needs about "
                         f"{need / 2**20:,.0f} MiB (artifact and journal); free space or choose another --out")


_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
_DISK_WORDS = ("no space left on device", "read-only file system", "disk quota exceeded", "os error 28")


def disk_error(exc: BaseException) -> str | None:
    """What the output disk refused, if ``exc`` (an OSError, or a library's error wrapping one) is
    a full, read-only or forbidden disk; else None."""
    if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
        where = f" writing {exc.filename}" if exc.filename else ""
        return f"{exc.strerror or os.strerror(exc.errno)}{where}"
    text = str(exc).lower()
    for word in _DISK_WORDS:
        if word in text:
            return "No space left on device" if word == "os error 28" else word.capitalize()
    return None

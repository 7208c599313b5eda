"""Atomic file output: a file is either written whole or not at all."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from .errors import UsageError


def _umask_mode() -> int:
    """The mode a plainly created file gets (mkstemp's 0600 would hide outputs from other users)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def ensure_writable_dir(directory: str | os.PathLike) -> Path:
    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create output folder '{d}': {err.strerror}. Choose a writable path.") from err
    if not os.access(d, os.W_OK):
        raise UsageError(f"output folder '{d}' is not writable. Choose a writable path.")
    return d


def check_writable(path: str | os.PathLike, folder: bool = False) -> Path | None:
    """Check, without leaving anything behind, that ``path`` can be written (a file, or with ``folder``
    a folder to write into): each missing folder on the way can be made, and the nearest existing one
    takes a new entry. Returns the first folder that will have to be made (None if all exist); raises
    UsageError saying what to do.

    The check makes and removes a temporary entry in the nearest existing folder: ``os.access`` answers
    "writable" to root even where nothing can be created (/proc, a read-only bind mount)."""
    p = Path(path)
    if folder:
        if p.exists() and not p.is_dir():
            raise UsageError(f"'{p}' is a file, not a folder; give a folder path")
        target_dir = p
    else:
        if p.is_dir():
            raise UsageError(f"output path '{p}' is a folder; give a file name (e.g. {p / 'model.onnx'})")
        if p.exists() and not os.access(p, os.W_OK):
            raise UsageError(f"output file '{p}' exists and is not writable; choose another path")
        target_dir = p.parent if str(p.parent) else Path(".")
    existing, missing = target_dir, None
    while not existing.exists():
        missing, existing = existing, existing.parent
    if not existing.is_dir():
        where = f"cannot create output folder '{missing}': " if missing is not None else ""
        raise UsageError(f"cannot write '{p}': {where}'{existing}' is a file, not a folder. Choose another path")
    try:  # probe with a folder when one must be made, else with a file
        if missing is not None:
            os.rmdir(tempfile.mkdtemp(prefix=".qlfx-probe-", dir=existing))
        else:
            fd, probe = tempfile.mkstemp(prefix=".qlfx-probe-", dir=existing)
            os.close(fd)
            os.unlink(probe)
    except OSError as err:
        what = (f"cannot create output folder '{missing}'" if missing is not None
                else f"output folder '{existing}' is not writable")
        raise UsageError(f"cannot write '{p}': {what} ({err.strerror}). Choose a writable path") from err
    return missing


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    ensure_writable_dir(path.parent if str(path.parent) else ".")
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_output(path: str | os.PathLike):
    """Context manager giving a temporary path to write to; moved onto ``path`` only on success."""

    @contextlib.contextmanager
    def _cm():
        target = Path(path)
        ensure_writable_dir(target.parent if str(target.parent) else ".")
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=target.suffix, dir=target.parent)
        os.close(fd)
        try:
            yield Path(tmp)
            os.chmod(tmp, _umask_mode())
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    return _cm()

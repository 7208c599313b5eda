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

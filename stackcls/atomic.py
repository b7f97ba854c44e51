"""Writing files so that an interruption never leaves half of one: every writer of the package
(labels CSV, JSON records, CV job records, predictions) goes through `replace_atomically`."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np


@contextlib.contextmanager
def replace_atomically(path, mode: str = "w", **open_kw):
    """Open a temp file beside `path` for writing; on success it is flushed, fsynced and renamed
    over `path`; on any error it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **open_kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _jsonable(o):
    if isinstance(o, (np.floating, np.integer, np.bool_)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json(path, obj) -> Path:
    """JSON (numpy scalars and arrays allowed), written atomically."""
    with replace_atomically(path) as f:
        json.dump(obj, f, indent=1, default=_jsonable)
    return Path(path)


def savez(path, **arrays) -> Path:
    """np.savez, written atomically."""
    with replace_atomically(path, "wb") as f:
        np.savez(f, **arrays)
    return Path(path)

"""Writing files safely: every writer of the package goes through this module.

- `replace_atomically`: an interruption never leaves half a file (labels CSV, JSON records, CV job
  records, predictions); an existing file keeps its permissions, and a symlink keeps pointing at
  the file it names (the target is replaced, not the link).
- In a multi-process run (`stackcls.parallel`) only process 0 writes: the others compute the same
  results and their writes go nowhere, so no file has two writers.
- `safe_name` / `inside`: a name read from a file (PatientID, series, phase) is hostile until made
  safe; no output may land outside the folder it was meant for.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


@contextlib.contextmanager
def replace_atomically(path, mode: str = "w", **open_kw):
    """Open a temp file beside `path` for writing; on success it is flushed, fsynced and renamed
    over `path`; on any error it is removed and `path` is left as it was. A process other than
    process 0 of a multi-process run writes into os.devnull instead."""
    if not _writer():
        with open(os.devnull, mode, **open_kw) as f:
            yield f
        return
    path = Path(os.path.realpath(path))           # through symlinks: replace the file they name
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        keep = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:                       # a new file gets the usual 0666 & ~umask
        umask = os.umask(0)
        os.umask(umask)
        keep = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, keep)                         # mkstemp makes 0600
        with os.fdopen(fd, mode, **open_kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _writer() -> bool:
    # JAX is imported only where a run already uses it (the labelling tool also writes here)
    jax = sys.modules.get("jax")
    return jax is None or jax.process_index() == 0


STALE_TMP_S = 60.0   # a temp file older than this belongs to a save that was killed, not a live one


def remove_stale_temps(path, age: float = STALE_TMP_S) -> None:
    """Delete the temp files `replace_atomically` made for `path` (`.{name}.XXXXXXXX.tmp`, mkstemp's
    names, beside the file it names) that are older than `age` seconds: left by killed saves."""
    real = Path(os.path.realpath(path))
    pattern = re.compile(re.escape(f".{real.name}.") + r"[a-z0-9_]{8}\.tmp")
    old = time.time() - age
    with contextlib.suppress(OSError), os.scandir(real.parent) as it:
        for e in it:
            with contextlib.suppress(OSError):
                if (pattern.fullmatch(e.name) and e.is_file(follow_symlinks=False)
                        and e.stat(follow_symlinks=False).st_mtime < old):
                    os.unlink(e.path)


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(*parts) -> str:
    """A file name from untrusted parts: anything but letters, digits, '.', '_' and '-' becomes
    '_', no '..', no leading or trailing dot, dash or '_' (no hidden files, no option-like names),
    at most 120 characters."""
    name = re.sub(r"\.{2,}", "_", "_".join(_UNSAFE.sub("_", str(p)) for p in parts))
    return re.sub(r"_{2,}", "_", name).strip("._-")[:120] or "_"


def inside(folder, name) -> Path:
    """folder / name, refused (ValueError) if it would resolve outside `folder`."""
    root = Path(os.path.realpath(folder))
    target = Path(os.path.realpath(root / name))
    if target != root and root not in target.parents:
        raise ValueError(f"refusing to write {name!r}: it resolves outside {root}")
    return target


def jsonable(o):
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
        json.dump(obj, f, indent=1, default=jsonable)
    return Path(path)


def savez(path, **arrays) -> Path:
    """np.savez, written atomically."""
    with replace_atomically(path, "wb") as f:
        np.savez(f, **arrays)
    return Path(path)

"""What the readers return and raise.

Readers never crash on one bad file: they record `(path, reason)` in `ScanResult.skipped` and go
on with the rest. `StackReadError` is raised only when nothing sensible can be returned (a missing
path, an empty folder, no stack at all for `load_stacks`), or for an unreadable labels CSV.
"""

from __future__ import annotations

import dataclasses
import errno

from stackcls.stack import Stack


def printable(text) -> str:
    """`text` safe to print to any UTF-8 stream and to store in JSON: bytes of a non-UTF-8 file name
    (which Python keeps as lone surrogates, e.g. b"bad\\xff" -> "bad\\udcff") become a visible
    `\\xff`; everything else is unchanged."""
    text = str(text)
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:                      # a surrogate no file name can hold
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def printable_tree(obj):
    """Every string of a JSON-bound tree through `printable` (a lone surrogate from a non-UTF-8
    file name is not a string other JSON readers accept)."""
    if isinstance(obj, str):
        return printable(obj)
    if isinstance(obj, dict):
        return {printable_tree(k): printable_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [printable_tree(v) for v in obj]
    return obj


_OS_REASONS = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
               errno.ELOOP: "symlink loop (too many levels of symbolic links)",
               errno.ENOENT: "no such file (or a broken symlink)",
               errno.ENAMETOOLONG: "file name too long"}


def os_reason(e: OSError) -> str:
    """A short reason for an OSError met while opening a file or listing a folder."""
    if isinstance(e, PermissionError):
        return "permission denied"
    return _OS_REASONS.get(e.errno) or f"cannot read ({e.strerror or type(e).__name__})"


class StackReadError(ValueError):
    """A file or folder could not be read into stacks; the message names the file and the reason."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class ModelFileError(ValueError):
    """A saved model's files (a run directory's config.json, checkpoint, direction.json) are
    malformed; the message starts with the file. Raised by `checkpoint` and `inference.load_model`."""


@dataclasses.dataclass
class ScanResult:
    """stacks: what could be read. skipped: (path, reason) for every file that looked like input but
    could not be used. ignored: (path, what) for known companion files that are not images
    (ACDC `_gt` masks and `_4d` cines, Info.cfg, CSV/README files)."""

    stacks: list[Stack]
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    ignored: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def __iter__(self):  # `stacks, skipped = scan(...)`
        return iter((self.stacks, self.skipped))

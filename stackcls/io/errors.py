"""What the readers return and raise.

Readers never crash on one bad file: they record `(path, reason)` in `ScanResult.skipped` and go
on with the rest. `StackReadError` is raised only when nothing sensible can be returned (a missing
path, an empty folder, no stack at all for `load_stacks`), or for an unreadable labels CSV.
"""

from __future__ import annotations

import dataclasses

from stackcls.stack import Stack


class StackReadError(ValueError):
    """A file or folder could not be read into stacks; the message names the file and the reason."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


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

"""Memory limits for decoding untrusted images (decompression bombs).

A small compressed file can declare a huge image: a 390 KB deflated DICOM or a 572 KB .nii.gz can
decode to gigabytes. The readers check the size a file declares (DICOM: Rows x Columns x
NumberOfFrames x SamplesPerPixel x BitsAllocated/8; NIfTI: the header's dim and datatype) before
decoding anything, and skip the file with the reason when it is over a limit:

- per file: STACKCLS_MAX_FILE_MB (default 512) megabytes (MiB, 2**20 bytes) of decoded pixels
  (counted as the larger of the stored pixels and their float32 copy), of file size on disk, and of
  an inflated deflate-compressed DICOM dataset;
- per stack: STACKCLS_MAX_STACK_MB (default 2048) MiB of decoded images in one DICOM series group;
  the files of a group past the limit are skipped, and so is the whole group.

Both are read here only, at each call, so a change of the environment applies to the next scan.
"""

from __future__ import annotations

import os

from stackcls.io.errors import StackReadError

MIB = 1 << 20
DEFAULT_FILE_MB = 512
DEFAULT_STACK_MB = 2048
FILE_ENV = "STACKCLS_MAX_FILE_MB"
STACK_ENV = "STACKCLS_MAX_STACK_MB"


def _limit(env: str, default: float) -> int:
    raw = os.environ.get(env, "").strip()
    if not raw:
        return int(default * MIB)
    try:
        mb = float(raw)
    except ValueError:
        mb = float("nan")
    if not (mb > 0 and mb < 1e9):  # also rejects NaN
        raise ValueError(f"environment variable {env}={raw!r}: expected a positive number of "
                         f"megabytes (default {default})")
    return int(mb * MIB)


def max_file_bytes() -> int:
    """Decoded bytes allowed for one file (STACKCLS_MAX_FILE_MB, default 512 MiB)."""
    return _limit(FILE_ENV, DEFAULT_FILE_MB)


def max_stack_bytes() -> int:
    """Decoded bytes allowed for one stack / DICOM series group (STACKCLS_MAX_STACK_MB, default
    2048 MiB)."""
    return _limit(STACK_ENV, DEFAULT_STACK_MB)


def decoded_bytes(n_values: int, stored_bytes_per_value: float) -> int:
    """Peak bytes of n_values decoded: the larger of the stored values and their float32 copy."""
    return int(n_values * max(float(stored_bytes_per_value), 4.0))


def mb(nbytes: float) -> str:
    """Bytes for a message: MB (MiB) from 1 MB up, KB below."""
    return f"{nbytes / MIB:,.1f} MB" if nbytes >= MIB else f"{nbytes / 1024:,.1f} KB"


def check_file(path, nbytes: int, what: str) -> None:
    """Raise StackReadError(path, ...) when `what` (e.g. 'declared image 30000 x 30000') needs more
    than the per-file limit."""
    limit = max_file_bytes()
    if nbytes > limit:
        raise StackReadError(path, f"{what} needs {mb(nbytes)}, over the per-file limit of "
                                   f"{mb(limit)} (set {FILE_ENV} to raise it): skipped without "
                                   "decoding (possible decompression bomb)")


class StackBudget:
    """Decoded bytes per stack (a DICOM series group), charged before each file is decoded.

    The file that takes a group past STACKCLS_MAX_STACK_MB raises, and so does every later file of
    that group; `over` holds the group keys, whose files already read the caller must drop too."""

    def __init__(self):
        self.limit = max_stack_bytes()
        self.used: dict = {}
        self.over: dict = {}  # key -> reason

    def charge(self, path, key, where: str, nbytes: int) -> None:
        total = self.used.get(key, 0) + nbytes
        self.used[key] = total
        if total > self.limit:
            self.over[key] = (f"{where} needs more than the per-stack limit of {mb(self.limit)} "
                              f"of decoded images (set {STACK_ENV} to raise it): the series is "
                              "skipped")
            raise StackReadError(path, self.over[key])

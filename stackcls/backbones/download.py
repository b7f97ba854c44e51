"""Keras Applications ImageNet weight files: where they come from, where they are cached.

Each port declares its files (`WeightFile`, usually through `keras_file`) in its registry entry;
`BackboneSpec.weight_file(...)` picks one. `fetch(wf)` returns a local path: a file shipped in the
package (`packaged`, hash checked), else Keras's own cache (`$KERAS_HOME/models` or
`~/.keras/models`), then ours (`$STACKCLS_CACHE/weights` or `~/.cache/stackcls/weights`), else it
downloads it from the Keras Applications bucket, verifies the hash Keras publishes (md5; sha256
where we checked the file ourselves) and moves it into our cache atomically (temp file in the same
folder, then os.replace). Offline (or with STACKCLS_OFFLINE=1) the error says which file to put
where.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from stackcls.progress import bar as tqdm

BASE = "https://storage.googleapis.com/tensorflow/keras-applications/"

# Weight files shipped inside the package (see imagenet/README.md there: provenance, licence).
PACKAGED_DIR = Path(__file__).resolve().parent / "imagenet"


class WeightsUnavailableError(RuntimeError):
    """The weight file is not cached and could not be downloaded (or failed verification)."""


@dataclass(frozen=True)
class WeightFile:
    """One no-top ImageNet file of Keras Applications and the options it serves.

    alpha / rows: the width multiplier and input size Keras trained the file for (None: the
    port has one file for all). packaged: shipped in PACKAGED_DIR (needs file_hash)."""

    fname: str  # the name Keras caches it under (~/.keras/models/<fname>)
    url: str
    file_hash: str | None = None  # md5 (32 hex) or sha256 (64 hex), as Keras's get_file accepts
    alpha: float | None = None
    rows: int | None = None
    packaged: bool = False

    def __post_init__(self):
        if self.packaged and not self.file_hash:
            raise ValueError(f"{self.fname}: a packaged weight file needs its hash")


def keras_file(path: str, file_hash: str | None = None, *, fname: str | None = None,
               alpha: float | None = None, rows: int | None = None,
               packaged: bool = False) -> WeightFile:
    """The file at `path` in the Keras Applications bucket; `fname` when Keras caches it under
    another name than the URL's (NASNet)."""
    return WeightFile(fname or path.rsplit("/", 1)[-1], BASE + path, file_hash, alpha, rows,
                      packaged)


def keras_cache_dir() -> Path:
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"


def cache_dir() -> Path:
    root = os.environ.get("STACKCLS_CACHE")
    return Path(root) / "weights" if root else Path.home() / ".cache" / "stackcls" / "weights"


def file_digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _algorithm(file_hash: str) -> str:
    return "sha256" if len(file_hash) == 64 else "md5"


def verify(path: Path, file_hash: str | None) -> bool:
    return file_hash is None or file_digest(path, _algorithm(file_hash)) == file_hash.lower()


def _where_to_put(wf: WeightFile, cache: Path) -> str:
    return (f"Download {wf.url} on a machine with network access and put it at "
            f"{keras_cache_dir() / wf.fname} or {cache / wf.fname} (or pass weights=<path>).")


def _packaged(wf: WeightFile) -> Path:
    p = PACKAGED_DIR / wf.fname
    if not p.is_file():
        raise WeightsUnavailableError(f"{p} is missing: the installed stackcls package is "
                                      "incomplete; reinstall it.")
    if not verify(p, wf.file_hash):
        raise WeightsUnavailableError(f"{p} does not match its {_algorithm(wf.file_hash)} "
                                      f"{wf.file_hash}: the installed package is damaged; "
                                      "reinstall it.")
    return p


def fetch(wf: WeightFile, cache: Path | None = None, *, offline: bool | None = None,
          timeout: float = 30.0, progress: bool = True) -> Path:
    """Local path of a weight file, downloading it into the cache if needed."""
    if wf.packaged:
        return _packaged(wf)
    cache = Path(cache) if cache is not None else cache_dir()
    for p in (keras_cache_dir() / wf.fname, cache / wf.fname):
        if p.is_file():
            if not verify(p, wf.file_hash):
                raise WeightsUnavailableError(
                    f"{p} does not match the published {_algorithm(wf.file_hash)} {wf.file_hash} "
                    f"(corrupt or partial file?); delete it to download it again.")
            return p
    if offline is None:
        offline = os.environ.get("STACKCLS_OFFLINE", "") not in ("", "0")
    if offline:
        raise WeightsUnavailableError(f"{wf.fname} is not cached and STACKCLS_OFFLINE is set. "
                                      + _where_to_put(wf, cache))
    return download(wf, cache, timeout=timeout, progress=progress)


def download(wf: WeightFile, cache: Path, *, timeout: float = 30.0, progress: bool = True) -> Path:
    """Download wf.url into cache/wf.fname: temp file, length and hash checks, then os.replace."""
    cache.mkdir(parents=True, exist_ok=True)
    dest = cache / wf.fname
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=wf.fname + ".", suffix=".part")
    try:
        try:
            with urllib.request.urlopen(wf.url, timeout=timeout) as resp, os.fdopen(fd, "wb") as out:
                total = resp.headers.get("Content-Length")
                total = int(total) if total is not None else None
                n = 0
                bar = None
                if progress:
                    bar = tqdm(total=total, unit="B", unit_scale=True, desc=wf.fname, leave=False)
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
                    n += len(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
                if bar is not None:
                    bar.close()
        except (urllib.error.URLError, OSError, ValueError) as e:
            if isinstance(e, urllib.error.HTTPError):
                reason = f"HTTP {e.code}"
            else:
                reason = str(getattr(e, "reason", e))
            raise WeightsUnavailableError(f"could not download {wf.url} ({reason}). "
                                          + _where_to_put(wf, cache)) from e
        if total is not None and n != total:
            raise WeightsUnavailableError(f"download of {wf.url} truncated: got {n} of {total} "
                                          "bytes; nothing was written. Try again.")
        if not verify(Path(tmp), wf.file_hash):
            raise WeightsUnavailableError(
                f"download of {wf.url} does not match the published {_algorithm(wf.file_hash)} "
                f"{wf.file_hash}; nothing was written. " + _where_to_put(wf, cache))
        os.replace(tmp, dest)
        return dest
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)

"""Keras Applications ImageNet weight files: where they come from, where they are cached.

Each port declares its files (`WeightFile`, usually through `keras_file`) in its registry entry;
`BackboneSpec.weight_file(...)` picks one. `fetch(wf)` returns a local path: a file shipped in the
package (`packaged`, hash checked), else Keras's own cache (`$KERAS_HOME/models` or
`~/.keras/models`), then ours (`$STACKCLS_CACHE/weights` or `~/.cache/stackcls/weights`), else it
downloads it from the Keras Applications bucket and moves it into our cache atomically (temp file
in the same folder, then os.replace). Offline (or with STACKCLS_OFFLINE=1) the error says which
file to put where.

Supply chain (docs/backbones.md, "Weights"):
- https only. An http:// URL is refused before any connection, and so is every redirect to a
  non-https URL. The one exception is for tests: with STACKCLS_TEST_LOOPBACK_HTTP=1, plain http
  to 127.0.0.1 is allowed (never to another host, never as a redirect from https).
- A file with a pinned hash (`verified`: the md5 Keras publishes, or a sha256 we computed on the
  file) is checked on download and on every use from a cache. A cached file that fails is
  deleted from our cache (ignored in Keras's, which is not ours) and downloaded again, or, offline,
  refused with an error naming it.
- A file without one (`verified` False: 45 MobileNet/MobileNetV2 files, Keras publishes no hash)
  must at least be a readable Keras HDF5 weight file; its first use in a process warns once
  (UnverifiedWeightsWarning) with the file's sha256, so that it can be checked and pinned.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import h5py

from stackcls.cache import cache_dir as user_cache
from stackcls.progress import bar as tqdm

BASE = "https://storage.googleapis.com/tensorflow/keras-applications/"

# Weight files shipped inside the package (see imagenet/README.md there: provenance, licence).
PACKAGED_DIR = Path(__file__).resolve().parent / "imagenet"

# Test-only: "1" allows plain http to 127.0.0.1 (the tests' loopback server), nothing else.
LOOPBACK_HTTP_ENV = "STACKCLS_TEST_LOOPBACK_HTTP"


class WeightsUnavailableError(RuntimeError):
    """The weight file is not cached and could not be downloaded (or failed verification)."""


class UnverifiedWeightsWarning(UserWarning):
    """A weight file without a pinned hash was used (once per file and process)."""


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

    @property
    def verified(self) -> bool:
        """True when the file's content is pinned by a hash (checked on download and use)."""
        return self.file_hash is not None


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
    return user_cache("weights")


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


def check_url(url: str, redirected_from: str | None = None) -> None:
    """Raise WeightsUnavailableError unless `url` may be fetched: https, or (tests only, with
    STACKCLS_TEST_LOOPBACK_HTTP=1) http to 127.0.0.1 that is not a redirect from https."""
    u = urllib.parse.urlsplit(url)
    if u.scheme == "https":
        return
    loopback = (u.scheme == "http" and u.hostname == "127.0.0.1"
                and os.environ.get(LOOPBACK_HTTP_ENV) == "1")
    downgrade = (redirected_from is not None
                 and urllib.parse.urlsplit(redirected_from).scheme == "https")
    if loopback and not downgrade:
        return
    via = f" (redirected from {redirected_from})" if redirected_from else ""
    raise WeightsUnavailableError(f"refusing to download {url}{via}: weight files are fetched "
                                  "over https only.")


class _HttpsOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """urllib's redirect handling, but every target must pass check_url (no https -> http)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        try:
            check_url(newurl, redirected_from=req.full_url)
        except WeightsUnavailableError:
            fp.close()
            raise
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _open(url: str, timeout: float):
    check_url(url)
    resp = urllib.request.build_opener(_HttpsOnlyRedirects).open(url, timeout=timeout)
    try:
        check_url(resp.geturl(), redirected_from=url)  # belt and braces: where we ended up
    except WeightsUnavailableError:
        resp.close()
        raise
    return resp


def h5_problem(path: Path) -> str | None:
    """None when `path` opens as HDF5 and has a Keras weight layout; else what is wrong."""
    try:
        with h5py.File(path, "r") as f:
            if "layer_names" in f.attrs or "layers" in f or (
                    "model_weights" in f and "layer_names" in f["model_weights"].attrs):
                return None
            return "is not a Keras weight file (no layer_names, model_weights or layers/)"
    except (OSError, ValueError) as e:
        return f"is not a readable HDF5 file ({e})"


def _problem(path: Path, wf: WeightFile) -> str | None:
    """Why the file at `path` must not be used as `wf` (None: it may)."""
    if wf.verified:
        algorithm = _algorithm(wf.file_hash)
        try:
            got = file_digest(path, algorithm)
        except OSError as e:
            return f"could not be read ({e})"
        if got != wf.file_hash.lower():
            return f"does not match its pinned {algorithm} {wf.file_hash} (got {got})"
        return None
    return h5_problem(path)


_WARNED: set[str] = set()


def _warn_unverified(wf: WeightFile, path: Path) -> None:
    if wf.verified or str(path) in _WARNED:
        return
    _WARNED.add(str(path))
    warnings.warn(f"{wf.fname}: no pinned hash (Keras publishes none for it); using {path} "
                  f"unverified, sha256 {file_digest(path, 'sha256')}. Compare it with a trusted "
                  "copy; docs/backbones.md says how to pin it.", UnverifiedWeightsWarning,
                  stacklevel=3)


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
    """Local path of a weight file, checked (hash, or HDF5 layout when it has none), downloading
    it into the cache if no cached copy passes."""
    if wf.packaged:
        return _packaged(wf)
    cache = Path(cache) if cache is not None else cache_dir()
    if offline is None:
        offline = os.environ.get("STACKCLS_OFFLINE", "") not in ("", "0")
    refused = []
    for p, ours in ((keras_cache_dir() / wf.fname, False), (cache / wf.fname, True)):
        if not p.is_file():
            continue
        problem = _problem(p, wf)
        if problem is None:
            _warn_unverified(wf, p)
            return p
        refused.append(f"{p} {problem}")
        if offline:
            continue
        if ours:
            p.unlink()
            action = "deleted it, downloading it again"
        else:
            action = "ignoring it (Keras's cache, not ours to delete), downloading into our cache"
        warnings.warn(f"{p} {problem}: {action}", stacklevel=2)
    if offline:
        state = (f"has no usable cached copy (refused: {'; '.join(refused)}; delete it)"
                 if refused else "is not cached")
        raise WeightsUnavailableError(f"{wf.fname} {state} and STACKCLS_OFFLINE is set. "
                                      + _where_to_put(wf, cache))
    path = download(wf, cache, timeout=timeout, progress=progress)
    _warn_unverified(wf, path)
    return path


def download(wf: WeightFile, cache: Path, *, timeout: float = 30.0, progress: bool = True) -> Path:
    """Download wf.url (https only) into cache/wf.fname: temp file, length and hash (or, without
    a pinned hash, HDF5 layout) checks, then os.replace."""
    try:
        check_url(wf.url)
    except WeightsUnavailableError as e:
        raise WeightsUnavailableError(f"{e} " + _where_to_put(wf, cache)) from None
    cache.mkdir(parents=True, exist_ok=True)
    dest = cache / wf.fname
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=wf.fname + ".", suffix=".part")
    try:
        try:
            with os.fdopen(fd, "wb") as out, _open(wf.url, timeout) as resp:
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
                f"download of {wf.url} does not match its pinned {_algorithm(wf.file_hash)} "
                f"{wf.file_hash}; nothing was written. " + _where_to_put(wf, cache))
        if not wf.verified and (problem := h5_problem(Path(tmp))):
            raise WeightsUnavailableError(f"download of {wf.url} {problem}; nothing was written.")
        os.replace(tmp, dest)
        return dest
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)

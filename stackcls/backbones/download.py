"""Keras Applications ImageNet weight files: where they come from, where they are cached.

`weight_file(name, **options)` names the file Keras would download for a backbone (no top);
`fetch(wf)` returns a local path: Keras's own cache (`$KERAS_HOME/models` or `~/.keras/models`),
then ours (`$STACKCLS_CACHE/weights` or `~/.cache/stackcls/weights`), else downloads it from the
Keras Applications bucket, verifies the hash Keras publishes (md5; sha256 where we know it) and
moves it into our cache atomically (temp file in the same folder, then os.replace). Offline (or
with STACKCLS_OFFLINE=1) the error says which file to put where.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

BASE = "https://storage.googleapis.com/tensorflow/keras-applications/"


class WeightsUnavailableError(RuntimeError):
    """The weight file is not cached and could not be downloaded (or failed verification)."""


@dataclass(frozen=True)
class WeightFile:
    fname: str  # the name Keras caches it under (~/.keras/models/<fname>)
    url: str
    file_hash: str | None = None  # md5 (32 hex) or sha256 (64 hex), as Keras's get_file accepts


_MOBILENET_ALPHAS = {0.25: "2_5", 0.5: "5_0", 0.75: "7_5", 1.0: "1_0"}
_MOBILENET_ROWS = (128, 160, 192, 224)
_MOBILENET_V2_ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
_MOBILENET_V2_ROWS = (96, 128, 160, 192, 224)

# Hashes we checked ourselves on the real file where Keras publishes none.
_KNOWN_SHA256 = {
    "mobilenet_2_5_224_tf_no_top.h5":
        "dbdb03ee2a22fd895301636cd328b234bb3a9952358f436d82f46b81e0d5b0bf",
}

# name -> (Keras cache file name, URL path under BASE, md5 from keras/src/applications/*.py)
_FIXED = {
    "vgg16": ("vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
              "vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
              "6d6bbae143d832006294945121d1f1fc"),
    "inception_v3": ("inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
                     "inception_v3/inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
                     "bcbd6486424b2319ff4ef7d526e38f63"),
    "resnet50_v2": ("resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
                    "resnet/resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
                    "fac2f116257151a9d068a22e544a4917"),
    "inception_resnet_v2": ("inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
                            "inception_resnet_v2/"
                            "inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
                            "d19885ff4a710c122648d3b5c3b684e4"),
    "densenet121": ("densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
                    "densenet/densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
                    "30ee3e1110167f948a6b9946edeeb738"),
    "nasnet_mobile": ("nasnet_mobile_no_top.h5", "nasnet/NASNet-mobile-no-top.h5",
                      "1ed92395b5b598bdda52abe5c0dbfd63"),
    "xception": ("xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
                 "xception/xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
                 "b0042744bf5b25fce3cb969f33bebb97"),
}


def weight_file(name: str, alpha: float | None = None, input_size: int | None = None) -> WeightFile:
    """The Keras no-top ImageNet weight file for a backbone (options as Keras picks its file)."""
    if name in _FIXED:
        fname, path, md5 = _FIXED[name]
        return WeightFile(fname, BASE + path, md5)
    if name == "mobilenet":
        alpha = 0.25 if alpha is None else float(alpha)
        if alpha not in _MOBILENET_ALPHAS:
            raise ValueError(f"mobilenet has ImageNet weights for alpha {list(_MOBILENET_ALPHAS)}, "
                             f"not {alpha}")
        rows = input_size if input_size in _MOBILENET_ROWS else 224
        fname = f"mobilenet_{_MOBILENET_ALPHAS[alpha]}_{rows}_tf_no_top.h5"
        return WeightFile(fname, BASE + "mobilenet/" + fname, _KNOWN_SHA256.get(fname))
    if name == "mobilenet_v2":
        alpha = 0.35 if alpha is None else float(alpha)
        if alpha not in _MOBILENET_V2_ALPHAS:
            raise ValueError(f"mobilenet_v2 has ImageNet weights for alpha "
                             f"{list(_MOBILENET_V2_ALPHAS)}, not {alpha}")
        rows = input_size if input_size in _MOBILENET_V2_ROWS else 224
        fname = f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{alpha}_{rows}_no_top.h5"
        return WeightFile(fname, BASE + "mobilenet_v2/" + fname, _KNOWN_SHA256.get(fname))
    raise KeyError(f"no Keras ImageNet weights known for {name!r}")


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


def fetch(wf: WeightFile, cache: Path | None = None, *, offline: bool | None = None,
          timeout: float = 30.0, progress: bool = True) -> Path:
    """Local path of a weight file, downloading it into the cache if needed."""
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
                    from stackcls.progress import bar as tqdm
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

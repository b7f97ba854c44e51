"""The user cache folder every part of stackcls writes to: $STACKCLS_CACHE, else
~/.cache/stackcls. Never ../shared nor the package directory (both may be read-only)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(sub: str) -> Path:
    """$STACKCLS_CACHE/sub, else ~/.cache/stackcls/sub (not created here)."""
    env = os.environ.get("STACKCLS_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "stackcls") / sub


# ----------------------------------------------------------------------------- compile cache

NO_COMPILE_CACHE = "STACKCLS_NO_COMPILE_CACHE"
COMPILE_SUB = "jax"
_compile_cache: dict = {}      # {"dir": Path | None} once decided: a process decides only once


class CompileCacheWarning(UserWarning):
    """The persistent compilation cache could not be used; everything still works, only slower."""


def compile_cache() -> Path | None:
    """Turn on JAX's persistent compilation cache in cache_dir("jax") (once per process) and return
    its folder, or None when it is off: STACKCLS_NO_COMPILE_CACHE=1, or a folder that cannot be
    created or written (one warning, then the run goes on uncached).

    A one-study CLI run spends most of its time compiling the same small programs every process
    needs; JAX keys entries on the program, its version, backend and device, so reuse is safe.
    Thresholds are zero because most of those programs are tiny eager ops, each cheap alone but
    costly together. If JAX is not imported yet only environment variables are set (JAX reads them
    when it loads), so calling this never costs the JAX import; a cache folder the user already
    gave JAX is left alone."""
    if "dir" in _compile_cache:
        return _compile_cache["dir"]
    _compile_cache["dir"] = None
    if os.environ.get(NO_COMPILE_CACHE, "").strip().lower() not in ("", "0", "false", "no"):
        return None
    import sys
    jax = sys.modules.get("jax")
    given = (jax.config.jax_compilation_cache_dir if jax is not None
             else os.environ.get("JAX_COMPILATION_CACHE_DIR"))
    if given:
        _compile_cache["dir"] = Path(given)
        return _compile_cache["dir"]
    d = cache_dir(COMPILE_SUB)
    try:
        d.mkdir(parents=True, exist_ok=True)
        # a folder that exists but refuses writes (read-only mount, full disk) fails here, once,
        # instead of JAX warning on every program it tries to store
        import tempfile
        with tempfile.NamedTemporaryFile(dir=d, prefix=".probe-"):
            pass
    except OSError as e:
        import warnings
        warnings.warn(f"stackcls: compilation cache off ({d}: {e.strerror or e}); "
                      f"set {NO_COMPILE_CACHE}=1 to silence", CompileCacheWarning, stacklevel=2)
        return None
    settings = dict(jax_compilation_cache_dir=str(d), jax_persistent_cache_min_compile_time_secs=0.0,
                    jax_persistent_cache_min_entry_size_bytes=0)
    if jax is not None:
        for k, v in settings.items():
            jax.config.update(k, v)
        try:    # JAX decides once, at its first compile, whether a cache exists: ask it again
            from jax._src import compilation_cache
            compilation_cache.reset_cache()
        except (ImportError, AttributeError):
            pass
    else:
        for k, v in settings.items():
            os.environ.setdefault(k.upper(), str(v))
    _compile_cache["dir"] = d
    return d

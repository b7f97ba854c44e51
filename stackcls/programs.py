"""Traced programs kept on disk, so that a new process skips tracing as well as compiling.

The persistent compilation cache (cache.compile_cache) saves XLA's work, but JAX must first trace
the Python function to find the program to look up, and tracing five networks costs a one-study
CLI run seconds on every start. `Program` is jax.jit whose traced program, per input signature,
is serialised with jax.export into cache_dir("programs"); a later process deserialises it and
goes straight to the (cached) compilation.

An entry's name hashes everything that decides the program: the caller's key (what the function
computes, e.g. a model's architecture and config), the stackcls source (any edit retraces), the
JAX version, the backend and the input signature. It is read only when the compilation cache is
on (STACKCLS_NO_COMPILE_CACHE turns both off), and only on one device: with a local mesh the
inputs are sharded and plain jit runs. A missing, damaged or unwritable entry only costs a trace.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import jax

from stackcls import parallel
from stackcls.atomic import replace_atomically
from stackcls.cache import cache_dir, compile_cache

SUB = "programs"
_SOURCE: list = []           # the digest of the package's source, computed once per process


def source_digest() -> str:
    """sha256 over every .py file of the stackcls package (path and bytes)."""
    if not _SOURCE:
        root = Path(__file__).resolve().parent
        h = hashlib.sha256()
        for f in sorted(root.rglob("*.py")):
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
        _SOURCE.append(h.hexdigest())
    return _SOURCE[0]


class Program:
    """jax.jit(fn) whose traced program is kept across processes (see the module's docstring).

    fn takes and returns pytrees of arrays; the exported program takes their flattened leaves,
    so no pytree type needs registering for serialisation. `key`: a string naming what fn
    computes, beyond its source code (e.g. the model's config)."""

    def __init__(self, fn, name: str, key: str):
        self.fn, self.name, self.key = fn, name, key
        self._jit = jax.jit(fn)
        self._calls: dict = {}
        self.loaded = 0       # signatures read from disk in this process (for tests)

    def __call__(self, *args):
        if parallel.local_mesh() is not None or compile_cache() is None:
            return self._jit(*args)
        leaves, tree = jax.tree.flatten(args)
        sig = (tree, tuple((tuple(x.shape), str(x.dtype)) for x in leaves))
        call = self._calls.get(sig)
        if call is None:
            call = self._calls[sig] = self._program(tree, leaves, sig)
        return call(*leaves)

    def _program(self, tree, leaves, sig):
        from jax import export
        path = _entry(self.name, [self.key, repr(sig[1]), str(tree)], ".bin")
        try:
            exp = export.deserialize(bytearray(path.read_bytes()))
            self.loaded += 1
        except Exception:     # absent or unreadable (a cache: any failure only costs the trace)
            def flat(*xs):
                return self.fn(*jax.tree.unflatten(tree, xs))
            exp = export.export(jax.jit(flat))(
                *(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves))
            _write(path, exp.serialize())
        return jax.jit(exp.call)


def checked(name: str, key: str) -> bool:
    """Whether `mark_checked(name, key)` was called with this cache, stackcls source and JAX (a
    check that need not run again: e.g. a model file's variables against the modules it fills).
    Always False with the cache off."""
    return compile_cache() is not None and _entry(name, [key], ".checked").is_file()


def mark_checked(name: str, key: str) -> None:
    if compile_cache() is not None:
        _write(_entry(name, [key], ".checked"), b"")


def _entry(name: str, parts: list[str], suffix: str) -> Path:
    """The cache file of `name` for these key parts, this stackcls source, JAX and backend."""
    digest = hashlib.sha256("\0".join([*parts, source_digest(), jax.__version__,
                                        jax.default_backend()]).encode()).hexdigest()[:32]
    return cache_dir(SUB) / f"{name}-{digest}{suffix}"


def _write(path: Path, data: bytes) -> None:
    """Atomically, or not at all: a read-only or full cache folder is not an error here."""
    try:
        with replace_atomically(path, "wb") as f:
            f.write(data)
    except OSError:
        pass

"""One way to run a compiled function over many samples: chunks along the leading axis.

Every full-dataset pass of the package (backbone features, trunk activations, classifier outputs,
prediction, Grad-CAM) goes through `map_chunks`: inputs are cut into `chunk` rows, the last chunk
is padded by repeating its last row so that one compiled shape serves the whole pass, and the
outputs (any pytree with a leading sample axis) are trimmed and concatenated. Samples never
interact inside these functions (inference-mode BatchNorm), so padding changes no real row.

With several local devices (`stackcls.parallel.activate`) each chunk's rows are sharded over them
and jit runs the chunk on all of them at once. Only chunks whose size the device count divides are
sharded: the chunk size is never changed for it, since callers derive per-chunk random draws from
it (`inference.extract`'s rotated views).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from stackcls import parallel


def n_rows(tree) -> int:
    return int(jax.tree.leaves(tree)[0].shape[0])


def map_chunks(fn: Callable, inputs, chunk: int | None, *, with_index: bool = False, bar=None,
               pad: bool = True, host: bool = False):
    """fn(chunk_inputs[, chunk_number]) over `inputs` (a pytree of arrays with N leading rows).

    chunk None: one call on the whole input, unpadded. Otherwise every call gets exactly `chunk`
    rows (a short input is padded too: one compiled shape whatever N). with_index: fn also gets the
    chunk's number (0, 1, ...), e.g. to derive a PRNG key per chunk. pad=False: a short last chunk
    runs at its own size (a second compile; only where a caller's recorded results ran it so).
    bar: a progress bar to update by the rows done. Returns fn's output pytree with N rows: device
    arrays, or numpy ones with host=True (then numpy inputs are cut and padded in numpy too: no
    eager device op, each of which would be compiled anew for every stack length).
    """
    n = n_rows(inputs)
    if chunk is None:
        out = fn(inputs, 0) if with_index else fn(inputs)
        if bar is not None:
            bar.update(n)
        return out
    mesh = parallel.local_mesh()
    parts = []
    for i, s in enumerate(range(0, n, chunk)):
        piece = jax.tree.map(lambda a: a[s:s + chunk], inputs)
        k = n_rows(piece)
        if k < chunk and pad:   # one compiled shape: repeat the last row
            piece = jax.tree.map(lambda a: _xp(a).concatenate([a, _xp(a).repeat(a[-1:], chunk - k, 0)]), piece)
        piece = jax.tree.map(_device, piece)
        if mesh is not None and n_rows(piece) % mesh.devices.size == 0:
            piece = parallel.rows(piece, mesh)
        out = fn(piece, i) if with_index else fn(piece)
        if host:
            out = jax.tree.map(np.asarray, out)
        parts.append(jax.tree.map(lambda a: a[:k], out) if k < chunk and pad else out)
        if bar is not None:
            bar.update(k)
    return jax.tree.map(lambda *a: (np if host else jnp).concatenate(a), *parts)


def _xp(a):
    return np if isinstance(a, np.ndarray) else jnp


def _device(a):
    # device_put, not jnp.asarray: in this JAX the latter stages one small program per shape
    return jax.device_put(a) if isinstance(a, np.ndarray) else jnp.asarray(a)


def to_numpy(tree):
    return jax.tree.map(np.asarray, tree)

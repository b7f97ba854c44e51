"""Inference throughput of our jitted `features` vs the Keras reference (JAX backend).

    python benchmarks/backbones.py [NAME ...] [--batch 8] [--size S] [--dtype bfloat16] [--repeats 5]

For each backbone: one Keras model (keras.applications, include_top=False, pooling="avg",
random weights), the same weights loaded into our port through a legacy .h5 file, the same
batch; both warmed up, then timed (median of --repeats). Keras is timed on its faster path:
`predict_on_batch` or a jitted `stateless_call` (training=False), on already-preprocessed input
(its preprocess_input runs outside the timing; ours runs inside features()). The table gives
images/s and ours/Keras. With --depthwise-both, MobileNets, Xception and NASNet are also timed
with the grouped-convolution depthwise path, to show what the shifted formulation buys.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the Keras constructor table lives with the tests

import h5py  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras_reference import KERAS  # noqa: E402

from stackcls.models import backbones as B  # noqa: E402
from stackcls.models.backbones import layers as L  # noqa: E402

DEPTHWISE = {"mobilenet", "mobilenet_v2", "xception", "nasnet_mobile"}


def timed(fn, repeats):
    fn()
    fn()  # warm-up (compile, caches)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def keras_runners(km, xk):
    out = {"predict_on_batch": lambda: np.asarray(km.predict_on_batch(xk))}
    tv = [jnp.array(v.value, copy=True) for v in km.trainable_variables]  # predict_on_batch
    # may donate the live buffers
    ntv = [jnp.array(v.value, copy=True) for v in km.non_trainable_variables]

    @jax.jit
    def call(tv, ntv, x):
        return km.stateless_call(tv, ntv, x, training=False)[0]

    xj = jnp.asarray(xk)
    out["jit stateless_call"] = lambda: call(tv, ntv, xj).block_until_ready()
    return out


def bench(name, batch, size, dtype, repeats, depthwise_both):
    ref = KERAS[name]
    size = size or B.spec(name).input_size
    km = ref.build(size)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "w.h5"
        with h5py.File(p, "w") as f:
            keras.src.legacy.saving.legacy_h5_format.save_weights_to_hdf5_group(f, km)
        ours = B.create(name, weights=p, input_size=size, **ref.options)
    if dtype == "bfloat16":  # the same weights in an all-bfloat16 Keras model
        keras.config.set_dtype_policy("bfloat16")
        try:
            kb = ref.build(size)
        finally:
            keras.config.set_dtype_policy("float32")
        kb.set_weights(km.get_weights())
        km = kb
    x = np.random.default_rng(0).uniform(0, 255, (batch, size, size, 3)).astype("float32")
    xk = ref.preprocess(x)
    if dtype == "bfloat16":
        xk = xk.astype(jnp.bfloat16)
    dt = None if dtype == "float32" else jnp.bfloat16

    row = {"name": name if dtype == "float32" else f"{name} ({dtype})", "size": size,
           "batch": batch}
    xd = jnp.asarray(x)  # device-resident, like Keras's jitted path
    t_ours = timed(lambda: B.features(ours, xd, dtype=dt).block_until_ready(), repeats)
    row["ours"] = batch / t_ours
    if depthwise_both and name in DEPTHWISE:
        L.DEPTHWISE_IMPL = "grouped"
        B._features_fn.cache_clear()
        row["ours_grouped"] = batch / timed(
            lambda: B.features(ours, xd, dtype=dt).block_until_ready(), repeats)
        L.DEPTHWISE_IMPL = os.environ.get("STACKCLS_DEPTHWISE", "auto")
        B._features_fn.cache_clear()
    best = 0.0
    for k, fn in keras_runners(km, xk).items():
        r = batch / timed(fn, repeats)
        row[k] = r
        best = max(best, r)
    row["ratio"] = row["ours"] / best
    want = np.asarray(km(xk, training=False), np.float32)
    got = np.asarray(B.features(ours, x, dtype=dt), np.float32)
    row["rel_err"] = float(np.abs(got - want).max() / np.abs(want).max())
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=None, help="input size (default: the backbone's)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--depthwise-both", action="store_true",
                    help="also time our grouped-convolution depthwise path")
    a = ap.parse_args(argv)
    names = a.names or [n for n in B.names() if n in KERAS]
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"batch {a.batch}, {a.dtype}, median of {a.repeats}")
    cols = ["name", "size", "ours", "ours_grouped", "predict_on_batch", "jit stateless_call",
            "ratio", "rel_err"]
    print(" | ".join(f"{c:>18}" if i else f"{c:<20}" for i, c in enumerate(cols)))
    for n in names:
        try:
            row = bench(n, a.batch, a.size, a.dtype, a.repeats, a.depthwise_both)
        except Exception as e:  # keep going: one broken port should not hide the others
            print(f"{n:<20} | failed: {type(e).__name__}: {e}")
            continue
        cells = []
        for i, c in enumerate(cols):
            v = row.get(c, "")
            if isinstance(v, float):
                v = f"{v:.3g}" if c == "rel_err" else (f"{v:.2f}" if c == "ratio" else f"{v:.1f} img/s")
            cells.append(f"{v:>18}" if i else f"{v:<20}")
        print(" | ".join(cells), flush=True)


if __name__ == "__main__":
    main()

"""Each port computes what keras.applications computes, given the same weights and input.

For every name in tests/keras_reference.py: build the Keras model (JAX backend) with random
weights and re-drawn BatchNorm statistics/gamma/beta, save a legacy Keras 2 HDF5 file, load it
into our port with create(weights=path), and compare features() (our preprocessing inside) with
Keras's model(preprocess_input(x)). Also the real MobileNet ImageNet file at 224, as packaged.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import h5py
import jax
import numpy as np
import pytest
from flax import nnx

from stackcls.models import backbones as B
from stackcls.models.backbones import download as D
from stackcls.models.backbones.layers import keras_layers
from stackcls.models.classifier import trainable_filter

keras = pytest.importorskip("keras")

from keras_reference import KERAS  # noqa: E402  (imports keras: only once it is known present)


def randomize_bn(km, seed=0):
    """Gamma, beta and moving statistics away from 1/0, so a port that ignores one shows."""
    rng = np.random.default_rng(seed)
    for layer in km.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape if layer.gamma is not None else layer.moving_mean.shape
            vals = {"gamma": rng.uniform(0.5, 1.5, c), "beta": rng.normal(0, 0.2, c),
                    "moving_mean": rng.normal(0, 0.2, c),
                    "moving_variance": rng.uniform(0.5, 2.0, c)}
            for v in layer.weights:
                key = v.path.split("/")[-1]
                v.assign(vals[key].astype("float32"))
        elif layer.weights and "bias" in [v.path.split("/")[-1] for v in layer.weights]:
            for v in layer.weights:
                if v.path.endswith("bias"):
                    v.assign(rng.normal(0, 0.1, v.shape).astype("float32"))


def save_legacy_h5(km, path):
    """The Keras 2 weights-only HDF5 layout that keras.applications downloads."""
    with h5py.File(path, "w") as f:
        keras.src.legacy.saving.legacy_h5_format.save_weights_to_hdf5_group(f, km)
    return path


def keras_features(km, pre, x):
    return np.asarray(km(pre(x), training=False))


@pytest.mark.parametrize("name", list(KERAS))
def test_matches_keras(name, tmp_path):
    ref = KERAS[name]
    km = ref.build(ref.size)
    randomize_bn(km)
    path = save_legacy_h5(km, tmp_path / f"{name}.h5")
    ours = B.create(name, weights=path, input_size=ref.size, **ref.options)
    x = np.random.default_rng(1).uniform(0, 255, (2, ref.size, ref.size, 3)).astype("float32")
    want = keras_features(km, ref.preprocess, x)
    got = np.asarray(B.features(ours, x))
    assert got.shape == want.shape
    scale = np.abs(want).max()
    assert scale > 0
    err = np.abs(got - want).max()
    assert err <= 1e-4 * scale, f"{name}: max|diff| {err:.3g} vs max|keras| {scale:.3g}"

    # Depth 1 trains the last block: same trainable parameter count as Keras's layers there.
    # Pair layers by position (the order the file was loaded by), names may be session-dependent.
    order = ours.keras_order()
    last = set(keras_layers(ours.block_last))
    assert last, f"{name}: block_last holds no layers"
    klayers = [l for l in km.layers if l.weights]
    assert len(klayers) == len([n for n in order if keras_layers(ours)[n].keras_weights()])
    kcount = sum(int(np.prod(v.shape)) for l, n in zip(klayers, order) if n in last
                 for v in l.trainable_weights)
    ocount = sum(v.size for v in jax.tree.leaves(nnx.state(ours, trainable_filter("carry"))))
    assert ocount == kcount


def test_real_mobilenet_weights_match_keras():
    """The packaged file, read by Keras itself and by our loader (weights="imagenet")."""
    wf = B.spec("mobilenet").weight_file()
    km = keras.applications.MobileNet(alpha=0.25, include_top=False, weights=None, pooling="avg",
                                      input_shape=(224, 224, 3))
    km.load_weights(D.fetch(wf))
    ours = B.create("mobilenet", weights="imagenet")
    x = np.random.default_rng(2).uniform(0, 255, (2, 224, 224, 3)).astype("float32")
    want = keras_features(km, KERAS["mobilenet"].preprocess, x)
    got = np.asarray(B.features(ours, x))
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()

"""ResNet50V2, DenseNet121, Xception beyond the shared numeric equivalence test
(tests/test_keras_equivalence.py): Keras layer order, Keras-2-style auto-named files, the last
block's contents, trunk/last_block composition, weight-file metadata."""

from __future__ import annotations

import inspect
import os
import re

os.environ.setdefault("KERAS_BACKEND", "jax")

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stackcls import backbones as B
from stackcls.backbones import download
from stackcls.backbones.layers import keras_layers

keras = pytest.importorskip("keras")

AUTO = re.compile(r"^(conv2d|batch_normalization)(_\d+)?$")
KERAS_CTOR = {"resnet50_v2": ("resnet_v2", "ResNet50V2", 64),
              "densenet121": ("densenet", "DenseNet121", 64),
              "xception": ("xception", "Xception", 71)}


def _keras_model(name):
    mod, cls, size = KERAS_CTOR[name]
    return getattr(getattr(keras.applications, mod), cls)(
        include_top=False, weights=None, pooling="avg", input_shape=(size, size, 3))


def _kind(n):
    m = AUTO.match(n)
    return m.group(1) if m else n


@pytest.mark.parametrize("name", list(KERAS_CTOR))
def test_keras_order_is_keras_model_layers_order(name):
    """keras_order() is what Keras's own legacy loader pairs file layers with (auto-named layers
    compared by kind: their numbering depends on the session)."""
    km = _keras_model(name)
    want = [l.name for l in km.layers if l.weights]
    got = B.create(name, weights=None, input_size=KERAS_CTOR[name][2]).keras_order()
    assert [_kind(n) for n in got] == [_kind(n) for n in want]


def test_xception_loads_keras2_style_auto_names(tmp_path):
    """The real xception file names its shortcut convs conv2d_1.. (Keras 2 numbering), not ours:
    the loader must fall back to Keras layer order and put every array in its layer."""
    keras.layers.Conv2D(1, 1, name=None)  # shift Keras's auto-name counters, as in a Keras 2 file
    keras.layers.BatchNormalization()
    km = _keras_model("xception")
    klayers = [l for l in km.layers if l.weights]
    assert any(AUTO.match(l.name) for l in klayers)
    rng = np.random.default_rng(0)
    for l in klayers:
        l.set_weights([rng.normal(0, 1, w.shape).astype("float32") for w in l.get_weights()])
    ours_names = B.create("xception", weights=None, input_size=71).keras_order()
    assert [l.name for l in klayers] != ours_names  # the order path, not the name path
    from keras.src.legacy.saving import legacy_h5_format
    path = tmp_path / "xception.h5"
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, km)
    ours = B.create("xception", weights=path, input_size=71)
    by_name = keras_layers(ours)
    for kl, on in zip(klayers, ours.keras_order()):
        for kw, ov in zip(kl.get_weights(), by_name[on].keras_weights()):
            np.testing.assert_array_equal(np.asarray(ov[...]), kw, err_msg=f"{kl.name} -> {on}")


LAST = {"resnet50_v2": (r"^(conv5_block3_.*|post_bn)$", 7),
        "densenet121": (r"^(conv5_block\d+_.*|bn)$", 16 * 4 + 1),
        "xception": (r"^block14_.*$", 4)}


@pytest.mark.parametrize("name", list(LAST))
def test_block_last_holds_exactly_the_last_block(name):
    pattern, n = LAST[name]
    m = B.create(name, weights=None, input_size=KERAS_CTOR[name][2])
    inside = set(keras_layers(m.block_last))
    assert len(inside) == n
    assert all(re.match(pattern, k) for k in inside)
    outside = set(keras_layers(m)) - inside
    assert not [k for k in outside if re.match(pattern, k)]


def test_trunk_then_last_block_is_call_and_train_updates_only_last_block():
    m = B.create("resnet50_v2", weights=None, input_size=64)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 3)), jnp.float32)
    carry = m.trunk(x)
    assert carry.shape == (2, 2, 2, 2048)
    np.testing.assert_allclose(np.asarray(m.last_block(carry)), np.asarray(m(x)), rtol=1e-6)
    before = nnx.state(m, nnx.BatchStat)
    before = jax.tree.map(np.asarray, before)
    y = m.last_block(carry, train=True)
    assert y.shape == (2, 2, 2, 2048)
    after = jax.tree.map(np.asarray, nnx.state(m, nnx.BatchStat))
    changed = {"/".join(map(str, p)) for (p, a), (_, b) in
               zip(jax.tree_util.tree_leaves_with_path(after), jax.tree_util.tree_leaves_with_path(before))
               if not np.array_equal(a, b)}
    assert changed and all("block_last" in c for c in changed)
    assert len(changed) == 2 * 4  # moving mean and variance of the 4 BNs of conv5_block3 + post_bn


def test_weight_files_are_the_ones_keras_downloads():
    from keras.src.applications import densenet, resnet, xception
    wf = download.weight_file("resnet50_v2")
    assert wf.file_hash == resnet.WEIGHTS_HASHES["resnet50v2"][1]
    assert wf.url == resnet.BASE_WEIGHTS_PATH + wf.fname
    wf = download.weight_file("densenet121")
    assert wf.url == densenet.DENSENET121_WEIGHT_PATH_NO_TOP
    assert f'"{wf.fname}",\n{" " * 20}DENSENET121_WEIGHT_PATH_NO_TOP,' in inspect.getsource(densenet)
    assert f'file_hash="{wf.file_hash}"' in inspect.getsource(densenet.DenseNet)
    wf = download.weight_file("xception")
    assert wf.url == xception.WEIGHTS_PATH_NO_TOP
    assert f'file_hash="{wf.file_hash}"' in inspect.getsource(xception.Xception).split("else:")[-1]


def test_registry_metadata_and_input_limits():
    for name, size, pre in (("resnet50_v2", 224, "tf"), ("densenet121", 224, "torch"),
                            ("xception", 299, "tf")):
        s = B.spec(name)
        assert (s.input_size, s.preprocess) == (size, pre)
    with pytest.raises(ValueError, match="71"):
        B.create("xception", weights=None, input_size=64)

"""Keras `model.layers` order, which legacy weight files are matched by (beyond the numeric
equivalence test, tests/test_keras_equivalence.py):

- keras_graph.keras_order replays Keras's Functional ordering on small branching graphs;
- ResNet50V2, DenseNet121 and Xception list their layers in Keras's order;
- a Keras-2-style Xception file (session-numbered auto-names) loads by that order;
- the graph-replayed ports (InceptionV3, InceptionResNetV2, NASNetMobile) list every
  weight-bearing layer exactly once.
"""

from __future__ import annotations

import os
import re

os.environ.setdefault("KERAS_BACKEND", "jax")

import h5py
import numpy as np
import pytest

from stackcls.models import backbones as B
from stackcls.models.backbones.keras_graph import Sym, apply, keras_order
from stackcls.models.backbones.layers import keras_layers

AUTO = re.compile(r"^(conv2d|batch_normalization)(_\d+)?$")
KERAS_CTOR = {"resnet50_v2": ("resnet_v2", "ResNet50V2", 64),
              "densenet121": ("densenet", "DenseNet121", 64),
              "xception": ("xception", "Xception", 71)}


@pytest.fixture(scope="module")
def keras():
    """Keras is an optional test extra: only the comparisons with it skip without it."""
    return pytest.importorskip("keras")


class _Named:
    def __init__(self, name):
        self.name = name


def _sym_graph(spec, inputs, weighted):
    """spec: [(name, [input names])] in construction order -> output Sym."""
    nodes = {"input": inputs}
    for name, ins in spec:
        nodes[name] = apply(None, *[nodes[i] for i in ins],
                            layer=_Named(name) if name in weighted else None)
    return nodes[spec[-1][0]]


def _keras_graph(keras, spec, weighted):
    inp = keras.Input((8, 8, 4))
    nodes = {"input": inp}
    for name, ins in spec:
        xs = [nodes[i] for i in ins]
        if name in weighted:
            layer = keras.layers.Conv2D(4, 1, name=name)
        elif len(xs) > 1:
            layer = keras.layers.Add(name=name)
        else:
            layer = keras.layers.Activation("relu", name=name)
        nodes[name] = layer(xs if len(xs) > 1 else xs[0])
    return keras.Model(inp, nodes[spec[-1][0]])


# Branches of different lengths, a skip into a late merge, inputs listed out of creation order.
GRAPHS = [
    [("a", ["input"]), ("b1", ["a"]), ("b2", ["b1"]), ("c1", ["a"]), ("m", ["c1", "b2"]),
     ("d", ["m"])],
    [("s", ["input"]), ("p1", ["s"]), ("p2", ["p1"]), ("p3", ["p2"]), ("q1", ["s"]),
     ("r", ["q1", "p3"]), ("t1", ["r"]), ("u", ["t1", "s"]), ("v", ["u"]), ("w", ["v", "r"])],
]


@pytest.mark.parametrize("spec", GRAPHS)
def test_keras_order_replays_keras(keras, spec):
    weighted = {n for n, ins in spec if len(ins) == 1}
    km = _keras_graph(keras, spec, weighted)
    want = [l.name for l in km.layers if l.weights]
    got = [l.name for l in keras_order(_sym_graph(spec, Sym(), weighted))]
    assert got == want
    assert want != [n for n, _ in spec if n in weighted]  # the case is not trivial


def _keras_model(keras, name):
    mod, cls, size = KERAS_CTOR[name]
    return getattr(getattr(keras.applications, mod), cls)(
        include_top=False, weights=None, pooling="avg", input_shape=(size, size, 3))


def _kind(n):
    m = AUTO.match(n)
    return m.group(1) if m else n


@pytest.mark.parametrize("name", list(KERAS_CTOR))
def test_keras_order_is_keras_model_layers_order(keras, name):
    """keras_order() is what Keras's own legacy loader pairs file layers with (auto-named layers
    compared by kind: their numbering depends on the session)."""
    km = _keras_model(keras, name)
    want = [l.name for l in km.layers if l.weights]
    got = B.create(name, weights=None, input_size=KERAS_CTOR[name][2]).keras_order()
    assert [_kind(n) for n in got] == [_kind(n) for n in want]


def test_xception_loads_keras2_style_auto_names(keras, tmp_path):
    """The real xception file names its shortcut convs conv2d_1.. (Keras 2 numbering), not ours:
    the loader must fall back to Keras layer order and put every array in its layer."""
    keras.layers.Conv2D(1, 1, name=None)  # shift Keras's auto-name counters, as in a Keras 2 file
    keras.layers.BatchNormalization()
    km = _keras_model(keras, "xception")
    klayers = [l for l in km.layers if l.weights]
    assert any(AUTO.match(l.name) for l in klayers)
    rng = np.random.default_rng(0)
    for l in klayers:
        l.set_weights([rng.normal(0, 1, w.shape).astype("float32") for w in l.get_weights()])
    ours_names = B.create("xception", weights=None, input_size=71).keras_order()
    assert [l.name for l in klayers] != ours_names  # the order path, not the name path
    path = tmp_path / "xception.h5"
    with h5py.File(path, "w") as f:
        keras.src.legacy.saving.legacy_h5_format.save_weights_to_hdf5_group(f, km)
    ours = B.create("xception", weights=path, input_size=71)
    by_name = keras_layers(ours)
    for kl, on in zip(klayers, ours.keras_order()):
        for kw, ov in zip(kl.get_weights(), by_name[on].keras_weights()):
            np.testing.assert_array_equal(np.asarray(ov[...]), kw, err_msg=f"{kl.name} -> {on}")


@pytest.mark.parametrize("name", ["inception_v3", "inception_resnet_v2", "nasnet_mobile"])
def test_graph_replayed_order_is_a_permutation(name):
    model = B.create(name, weights=None)
    order = model.keras_order()
    assert len(order) == len(set(order))
    assert set(order) == set(keras_layers(model))

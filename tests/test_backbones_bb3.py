"""InceptionV3, InceptionResNetV2, NASNetMobile: what the shared Keras equivalence test does not
cover (tests/test_keras_equivalence.py proves outputs and layer order against Keras).

- keras_graph.keras_order against Keras's own Functional ordering on small branching graphs;
- keras_order lists every weight-bearing layer exactly once;
- block_last holds exactly the last block, with hand-counted trainable parameters.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax
import numpy as np
import pytest
from flax import nnx

from stackcls import backbones as B
from stackcls.backbones.keras_graph import Sym, apply, keras_order
from stackcls.backbones.layers import keras_layers


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


def _keras_graph(spec, weighted):
    import keras
    from keras import layers
    inp = keras.Input((8, 8, 4))
    nodes = {"input": inp}
    for name, ins in spec:
        xs = [nodes[i] for i in ins]
        if name in weighted:
            layer = layers.Conv2D(4, 1, name=name)
        elif len(xs) > 1:
            layer = layers.Add(name=name)
        else:
            layer = layers.Activation("relu", name=name)
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
def test_keras_order_replays_keras(spec):
    pytest.importorskip("keras")
    weighted = {n for n, ins in spec if len(ins) == 1}
    km = _keras_graph(spec, weighted)
    want = [l.name for l in km.layers if l.weights]
    got = [l.name for l in keras_order(_sym_graph(spec, Sym(), weighted))]
    assert got == want
    assert want != [n for n, _ in spec if n in weighted]  # the case is not trivial


@pytest.fixture(scope="module", params=["inception_v3", "inception_resnet_v2", "nasnet_mobile"])
def model(request):
    return B.create(request.param, weights=None)


def test_keras_order_is_a_permutation(model):
    order = model.keras_order()
    assert len(order) == len(set(order))
    assert set(order) == set(keras_layers(model))


def _trainable_last(model):
    return sum(v.size for v in jax.tree.leaves(nnx.state(model, B.trainable_filter(1))))


def test_block_last_holds_the_last_block(model):
    last = set(keras_layers(model.block_last))
    name = type(model).__name__
    if name == "InceptionV3":
        # mixed10: 9 conv2d_bn (conv without bias, BN beta only), input 2048 channels.
        assert len(last) == 18
        want = (2048 * 320 + 320 + 2048 * 384 + 384 + 2 * (3 * 384 * 384 + 384)
                + 2048 * 448 + 448 + 9 * 448 * 384 + 384 + 2 * (3 * 384 * 384 + 384)
                + 2048 * 192 + 192)
    elif name == "InceptionResNetV2":
        assert {"block8_10_conv", "conv_7b", "conv_7b_bn"} <= last and len(last) == 11
        want = (2080 * 192 + 192 + 2080 * 192 + 192 + 3 * 192 * 224 + 224 + 3 * 224 * 256 + 256
                + 448 * 2080 + 2080 + 2080 * 1536 + 1536)
    else:
        assert last == {n for n in keras_layers(model) if n.endswith("_12")}
        assert "adjust_conv_projection_12" in last
        want = None
    if want is not None:
        assert _trainable_last(model) == want
    assert _trainable_last(model) > 0



def test_last_block_trains(model):
    """Depth-1 training step on the last block alone: gradients reach every trainable parameter
    of block_last, train=True updates its BatchNorm moving statistics."""
    import jax.numpy as jnp
    import optax
    rng = np.random.default_rng(0)
    c = {"InceptionV3": 2048, "InceptionResNetV2": 2080, "NASNetMobile": 1056}[type(model).__name__]
    x = jnp.asarray(rng.normal(size=(2, 3, 3, c)).astype("float32"))
    carry = (x, x * 0.5) if type(model).__name__ == "NASNetMobile" else x
    before = jax.tree.map(np.asarray, nnx.state(model.block_last, nnx.BatchStat))
    opt = nnx.Optimizer(model, optax.sgd(1e-2), wrt=B.trainable_filter(1))

    @nnx.jit
    def step(model, opt, carry):
        def loss(m):
            return jnp.mean(m.last_block(carry, train=True) ** 2)
        grads = nnx.grad(loss, argnums=nnx.DiffState(0, B.trainable_filter(1)))(model)
        opt.update(model, grads)
        return grads

    grads = step(model, opt, carry)
    g = jax.tree.leaves(grads)
    assert sum(v.size for v in g) == _trainable_last(model)
    assert all(bool(jnp.isfinite(v).all()) for v in g) and any(bool((v != 0).any()) for v in g)
    after = jax.tree.map(np.asarray, nnx.state(model.block_last, nnx.BatchStat))
    assert any((a != b).any() for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))

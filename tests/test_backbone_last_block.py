"""The last convolutional block (`block_last`, what depth-1 training fine-tunes), beyond the
numeric equivalence test (tests/test_keras_equivalence.py):

- it holds exactly the last block's layers (ResNet50V2, DenseNet121, Xception, InceptionV3,
  InceptionResNetV2, NASNetMobile), with its trainable parameter count (hand-counted for the
  Inceptions; NASNet's is the count Keras gives those layers);
- trunk then last_block is the whole forward pass, and train=True updates only its BatchNorms;
- a depth-1 training step on the last block alone reaches every trainable parameter in it.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from stackcls.models import backbones as B
from stackcls.models.backbones.layers import keras_layers
from stackcls.models.classifier import trainable_filter

# Keras layer names of the last block and how many layers carry weights there.
LAST = {"resnet50_v2": (r"^(conv5_block3_.*|post_bn)$", 7),
        "densenet121": (r"^(conv5_block\d+_.*|bn)$", 16 * 4 + 1),
        "xception": (r"^block14_.*$", 4)}
SMALL = {"resnet50_v2": 64, "densenet121": 64, "xception": 71}


def _trainable_last(model):
    return sum(v.size for v in jax.tree.leaves(nnx.state(model, trainable_filter("carry"))))


@pytest.mark.parametrize("name", list(LAST))
def test_block_last_holds_exactly_the_last_block(name):
    pattern, n = LAST[name]
    m = B.create(name, weights=None, input_size=SMALL[name])
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
    before = jax.tree.map(np.asarray, nnx.state(m, nnx.BatchStat))
    y = m.last_block(carry, train=True)
    assert y.shape == (2, 2, 2, 2048)
    after = jax.tree.map(np.asarray, nnx.state(m, nnx.BatchStat))
    changed = {"/".join(map(str, p)) for (p, a), (_, b) in
               zip(jax.tree_util.tree_leaves_with_path(after), jax.tree_util.tree_leaves_with_path(before))
               if not np.array_equal(a, b)}
    assert changed and all("block_last" in c for c in changed)
    assert len(changed) == 2 * 4  # moving mean and variance of the 4 BNs of conv5_block3 + post_bn


@pytest.fixture(scope="module", params=["inception_v3", "inception_resnet_v2", "nasnet_mobile"])
def model(request):
    return B.create(request.param, weights=None)


def test_graph_replayed_block_last_holds_the_last_block(model):
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
        want = 712_800
    assert _trainable_last(model) == want


def test_last_block_trains(model):
    """Depth-1 training step on the last block alone: gradients reach every trainable parameter
    of block_last, train=True updates its BatchNorm moving statistics."""
    rng = np.random.default_rng(0)
    c = {"InceptionV3": 2048, "InceptionResNetV2": 2080, "NASNetMobile": 1056}[type(model).__name__]
    x = jnp.asarray(rng.normal(size=(2, 3, 3, c)).astype("float32"))
    carry = (x, x * 0.5) if type(model).__name__ == "NASNetMobile" else x
    before = jax.tree.map(np.asarray, nnx.state(model.block_last, nnx.BatchStat))
    opt = nnx.Optimizer(model, optax.sgd(1e-2), wrt=trainable_filter("carry"))

    @nnx.jit
    def step(model, opt, carry):
        def loss(m):
            return jnp.mean(m.last_block(carry, train=True) ** 2)
        grads = nnx.grad(loss, argnums=nnx.DiffState(0, trainable_filter("carry")))(model)
        opt.update(model, grads)
        return grads

    grads = step(model, opt, carry)
    g = jax.tree.leaves(grads)
    assert sum(v.size for v in g) == _trainable_last(model)
    assert all(bool(jnp.isfinite(v).all()) for v in g) and any(bool((v != 0).any()) for v in g)
    after = jax.tree.map(np.asarray, nnx.state(model.block_last, nnx.BatchStat))
    assert any((a != b).any() for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))

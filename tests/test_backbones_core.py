"""Registry, layers, preprocessing, features() and the CBR baselines (no Keras model needed here)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from stackcls.models import backbones as B
from stackcls.models.backbones import layers as L
from stackcls.models.backbones.cbr import CBR, CONFIGS
from stackcls.models.backbones.preprocessing import preprocess_input
from stackcls.models.classifier import feature_dim, trainable_filter

ISSUE_NAMES = ["vgg16", "mobilenet", "mobilenet_v2", "inception_v3", "resnet50_v2",
               "inception_resnet_v2", "densenet121", "nasnet_mobile", "xception",
               "cbr_large_t", "cbr_large_w", "cbr_small", "cbr_tiny"]


def test_names_and_specs():
    assert B.names() == ISSUE_NAMES
    assert B.available() == ISSUE_NAMES
    for n in B.names():
        s = B.spec(n)
        assert s.name == n
        assert s.input_size == (299 if n in ("inception_v3", "xception", "inception_resnet_v2")
                                else 224)
        assert s.preprocess == s.cls.preprocess  # stated once, on the port's class
        assert bool(s.pretrained) == (not n.startswith("cbr_"))
    assert B.spec("mobilenet").options == {"alpha": 0.25}
    assert B.spec("mobilenet_v2").options == {"alpha": 0.35}
    assert [B.spec(n).preprocess for n in ("vgg16", "densenet121", "mobilenet", "cbr_tiny")] == \
        ["caffe", "torch", "tf", "tf"]
    for name, size, pre in (("resnet50_v2", 224, "tf"), ("densenet121", 224, "torch"),
                            ("xception", 299, "tf")):
        s = B.spec(name)
        assert (s.input_size, s.preprocess) == (size, pre)
    assert (B.spec("xception").min_size, B.spec("inception_v3").min_size) == (71, 75)


def test_create_builds_what_the_spec_says():
    m = B.create("mobilenet", weights=None, input_size=64, alpha=0.5)
    assert (type(m), m.input_size, m.alpha, m.preprocess) == (B.spec("mobilenet").cls, 64, 0.5, "tf")
    assert B.create("vgg16", weights=None, input_size=32).preprocess == "caffe"
    assert B.create("cbr_tiny", weights=None).input_size == 224


def test_create_errors():
    with pytest.raises(KeyError, match="unknown backbone"):
        B.create("resnet18")
    with pytest.raises(TypeError, match="alpha"):
        B.create("vgg16", weights=None, alpha=0.5)
    with pytest.raises(ValueError, match="no ImageNet weights"):
        B.create("cbr_small")
    with pytest.raises(ValueError, match="input_size"):
        B.create("cbr_large_t", weights=None, input_size=128)
    with pytest.raises(ValueError, match="71"):
        B.create("xception", weights=None, input_size=64)


def test_preprocess_modes_match_hand_computed():
    x = np.random.default_rng(0).uniform(0, 255, (2, 4, 4, 3)).astype("float32")
    caffe = x[..., ::-1] - np.array([103.939, 116.779, 123.68], "float32")
    tf = x / 127.5 - 1
    torch = (x / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    for mode, want in [("caffe", caffe), ("tf", tf), ("torch", torch)]:
        np.testing.assert_allclose(preprocess_input(x, mode), want, rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError):
        preprocess_input(x, "bgr")


@pytest.mark.parametrize("k,stride,padding,size", [(3, 1, "SAME", 9), (3, 2, "SAME", 9),
                                                    (3, 2, "SAME", 8), (3, 2, "VALID", 9),
                                                    (5, 2, "SAME", 10), (3, 1, "VALID", 7)])
def test_depthwise_shift_equals_grouped_conv(k, stride, padding, size):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, size, size, 5)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, k, 5, 1)), jnp.float32)
    a = L.depthwise_conv_shift(x, w, (stride, stride), padding)
    b = L.depthwise_conv_grouped(x, w, (stride, stride), padding)
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # gradients too (depth-1 training of depthwise blocks goes through this path)
    ga = jax.grad(lambda w: L.depthwise_conv_shift(x, w, (stride, stride), padding).sum())(w)
    gb = jax.grad(lambda w: L.depthwise_conv_grouped(x, w, (stride, stride), padding).sum())(w)
    np.testing.assert_allclose(ga, gb, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k,stride,padding,size,cin,cout", [(3, 2, "SAME", 9, 3, 8), (3, 1, "SAME", 8, 3, 4),
                                                             (3, 2, "VALID", 9, 2, 5), (5, 2, "SAME", 10, 1, 8)])
def test_conv_shift_equals_convolution(k, stride, padding, size, cin, cout):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, size, size, cin)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, k, cin, cout)), jnp.float32)
    ref = jax.lax.conv_general_dilated(x, w, (stride, stride), padding,
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(L.conv_shift(x, w, (stride, stride), padding), ref, rtol=1e-5, atol=1e-5)
    ga = jax.grad(lambda w: L.conv_shift(x, w, (stride, stride), padding).sum())(w)
    gb = jax.grad(lambda w: jax.lax.conv_general_dilated(
        x, w, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")).sum())(w)
    np.testing.assert_allclose(ga, gb, rtol=1e-4, atol=1e-4)


def test_mobilenet_stem_takes_the_shift_path_on_cpu():
    """MobileNet 0.25's 3x3x3 -> 8 stem runs as conv_shift on CPU, VGG's -> 64 stem does not."""
    assert L._few_taps(jnp.zeros((3, 3, 3, 8)), (1, 1)) == (jax.default_backend() == "cpu")
    assert not L._few_taps(jnp.zeros((3, 3, 3, 64)), (1, 1))
    assert not L._few_taps(jnp.zeros((1, 1, 8, 16)), (1, 1))
    assert not L._few_taps(jnp.zeros((3, 3, 3, 8)), (2, 2))


def test_batchnorm_train_and_inference():
    bn = L.BatchNorm("bn", 3, momentum=0.9)
    bn.gamma[...] = jnp.array([1.0, 2.0, 0.5])
    bn.beta[...] = jnp.array([0.0, 1.0, -1.0])
    x = np.random.default_rng(0).normal(2.0, 3.0, (4, 5, 5, 3)).astype("float32")
    y = bn(jnp.asarray(x), train=True)
    m, v = x.mean((0, 1, 2)), x.var((0, 1, 2))
    np.testing.assert_allclose(y, (x - m) / np.sqrt(v + 1e-3) * [1, 2, 0.5] + [0, 1, -1],
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(bn.moving_mean[...], 0.1 * m, rtol=1e-5)
    np.testing.assert_allclose(bn.moving_variance[...], 0.9 + 0.1 * v, rtol=1e-5)
    y = bn(jnp.asarray(x), train=False)
    mm, mv = 0.1 * m, 0.9 + 0.1 * v
    np.testing.assert_allclose(y, (x - mm) / np.sqrt(mv + 1e-3) * [1, 2, 0.5] + [0, 1, -1],
                               rtol=1e-4, atol=1e-4)


def test_keras_order_survives_split_merge():
    m = B.create("mobilenet", weights=None, input_size=64)
    order = m.keras_order()
    assert order[:4] == ["conv1", "conv1_bn", "conv_dw_1", "conv_dw_1_bn"]
    assert order[-2:] == ["conv_pw_13", "conv_pw_13_bn"]
    g, s = nnx.split(m)
    assert nnx.merge(g, s).keras_order() == order
    g2, _ = nnx.split(B.create("mobilenet", weights=None, input_size=64, seed=1))
    assert g2 == g  # one compiled features() serves every instance of a configuration


def test_features_checks_size_and_chunks(mobilenet_weights):
    m = B.create("mobilenet", weights=mobilenet_weights, input_size=64)  # real, non-trivial values
    x = np.random.default_rng(0).uniform(0, 255, (5, 64, 64, 3)).astype("float32")
    full = np.asarray(B.features(m, x))
    assert full.shape == (5, 256) == (5, feature_dim(m, 64))
    assert full.std() > 0.1
    np.testing.assert_allclose(B.features(m, x, batch_size=2), full, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(B.features(m, x, batch_size=5), full)  # fits: one call
    with pytest.raises(ValueError, match="input_size 64"):
        B.features(m, x[:, :32, :32])
    # the model's structure is cached per model, its values are read on every call
    bn = m.block_last.block.pw_bn
    bn.beta[...] = bn.beta[...] + 100.0  # relu6 saturates: every feature becomes 6
    np.testing.assert_allclose(B.features(m, x), 6.0, rtol=1e-6)


def _cbr_params(kernel, filters):
    n, cin = 0, 3
    for f in filters:
        n += kernel * kernel * cin * f + f + 2 * f  # kernel, bias, gamma, beta (trainable)
        cin = f
    return n


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cbr_shapes_and_param_counts(name):
    k, filters = CONFIGS[name]
    m = B.create(name, weights=None)
    x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    out = jax.eval_shape(lambda x: m(x), x)
    spatial = {"cbr_large_t": 1, "cbr_large_w": 8, "cbr_tiny": 10, "cbr_small": 8}[name]
    assert out.shape == (2, spatial, spatial, filters[-1])
    params = sum(v.size for v in jax.tree.leaves(nnx.state(m, nnx.Param)))
    assert params == _cbr_params(k, filters)
    last = sum(v.size for v in jax.tree.leaves(nnx.state(m, trainable_filter("carry"))))
    cin = filters[-2]
    assert last == k * k * cin * filters[-1] + 3 * filters[-1]
    assert sum(v.size for v in jax.tree.leaves(nnx.state(m, trainable_filter("image")))) == params


def test_cbr_learns():
    """A few SGD steps on a tiny, separable batch lower the loss (whole net trained, BN in train
    mode)."""
    m = CBR(76, 5, (8, 16, 32, 64), rngs=nnx.Rngs(0))  # cbr_tiny's code path, narrower (fast)
    head = L.Dense("head", 64, 2, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 4)
    x = rng.uniform(0, 60, (8, 76, 76, 3)).astype("float32")
    x[y == 1, 20:50, 20:50] += 150  # class 1: a bright square
    x = preprocess_input(x, "tf")

    class Net(nnx.Module):
        def __init__(self):
            self.backbone, self.head = m, head

        def __call__(self, x, train):
            return self.head(self.backbone(x, train=train).mean((1, 2)))

    net = Net()
    opt = nnx.Optimizer(net, optax.sgd(0.05, momentum=0.9), wrt=nnx.Param)

    @nnx.jit
    def step(net, opt, x, y):
        def loss_fn(net):
            return optax.softmax_cross_entropy_with_integer_labels(net(x, True), y).mean()
        loss, g = nnx.value_and_grad(loss_fn)(net)
        opt.update(net, g)
        return loss

    losses = [float(step(net, opt, x, y)) for _ in range(8)]
    assert losses[-1] < 0.5 * losses[0], losses

"""Keras-equivalent layers in Flax NNX.

Each layer carries the name of the Keras layer it mirrors and lists its variables in the order
Keras stores them (`keras_weights()`), so one generic loader (weights.py) can fill any backbone
from a Keras weight file without per-model guesswork. Layouts follow Keras: NHWC activations,
HWIO kernels, depthwise kernels (kh, kw, C, 1).

Padding: Keras "same" with stride 2 pads asymmetrically (more on the bottom/right), exactly like
lax's "SAME", so we pass the string through.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_DN = ("NHWC", "HWIO", "NHWC")


def _zeros(shape):
    return jnp.zeros(shape, jnp.float32)


def _ones(shape):
    return jnp.ones(shape, jnp.float32)


def _glorot(rngs: nnx.Rngs, shape):
    return jax.nn.initializers.glorot_uniform()(rngs.params(), shape, jnp.float32)


def _he(rngs: nnx.Rngs, shape):
    return jax.nn.initializers.he_normal()(rngs.params(), shape, jnp.float32)


class KerasLayer(nnx.Module):
    """Base class: a layer with weights that maps 1:1 to a Keras layer."""

    name: str

    def keras_weights(self) -> list[nnx.Variable]:
        raise NotImplementedError


class Conv2D(KerasLayer):
    def __init__(self, name, in_ch, filters, kernel, strides=1, padding="same", use_bias=True,
                 dilation=1, *, rngs: nnx.Rngs):
        self.name = name
        k = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
        self.strides = (strides, strides) if isinstance(strides, int) else tuple(strides)
        self.dilation = (dilation, dilation) if isinstance(dilation, int) else tuple(dilation)
        self.padding = padding.upper()
        self.kernel = nnx.Param(_glorot(rngs, (*k, in_ch, filters)))
        self.bias = nnx.Param(_zeros((filters,))) if use_bias else None

    def __call__(self, x):
        y = jax.lax.conv_general_dilated(x, self.kernel[...], self.strides, self.padding,
                                         rhs_dilation=self.dilation, dimension_numbers=_DN)
        if self.bias is not None:
            y = y + self.bias[...]
        return y

    def keras_weights(self):
        return [self.kernel] + ([self.bias] if self.bias is not None else [])


def depthwise_conv(x, kernel, strides, padding):
    """Depthwise 2-D convolution, kernel (kh, kw, C, 1).

    Formulated as grouped convolution; backbones/layers.py is the single place to swap in a faster
    formulation (XLA:CPU runs feature_group_count convolutions far below their arithmetic cost).
    """
    c = x.shape[-1]
    k = kernel.reshape(kernel.shape[0], kernel.shape[1], 1, c)
    return jax.lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=_DN,
                                        feature_group_count=c)


class DepthwiseConv2D(KerasLayer):
    def __init__(self, name, channels, kernel=3, strides=1, padding="same", use_bias=True,
                 *, rngs: nnx.Rngs):
        self.name = name
        k = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
        self.strides = (strides, strides) if isinstance(strides, int) else tuple(strides)
        self.padding = padding.upper()
        self.kernel = nnx.Param(_glorot(rngs, (*k, channels, 1)))
        self.bias = nnx.Param(_zeros((channels,))) if use_bias else None

    def __call__(self, x):
        y = depthwise_conv(x, self.kernel[...], self.strides, self.padding)
        if self.bias is not None:
            y = y + self.bias[...]
        return y

    def keras_weights(self):
        return [self.kernel] + ([self.bias] if self.bias is not None else [])


class SeparableConv2D(KerasLayer):
    """Keras SeparableConv2D: depthwise (kh, kw, C, 1) then pointwise (1, 1, C, F), optional bias."""

    def __init__(self, name, in_ch, filters, kernel=3, strides=1, padding="same", use_bias=True,
                 *, rngs: nnx.Rngs):
        self.name = name
        k = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
        self.strides = (strides, strides) if isinstance(strides, int) else tuple(strides)
        self.padding = padding.upper()
        self.depthwise_kernel = nnx.Param(_glorot(rngs, (*k, in_ch, 1)))
        self.pointwise_kernel = nnx.Param(_glorot(rngs, (1, 1, in_ch, filters)))
        self.bias = nnx.Param(_zeros((filters,))) if use_bias else None

    def __call__(self, x):
        y = depthwise_conv(x, self.depthwise_kernel[...], self.strides, self.padding)
        y = jnp.einsum("nhwc,cf->nhwf", y, self.pointwise_kernel[...][0, 0])
        if self.bias is not None:
            y = y + self.bias[...]
        return y

    def keras_weights(self):
        w = [self.depthwise_kernel, self.pointwise_kernel]
        return w + ([self.bias] if self.bias is not None else [])


class BatchNorm(KerasLayer):
    """Keras BatchNormalization over the last axis.

    Keras stores [gamma (if scale), beta (if center), moving_mean, moving_variance]. In training
    mode (`train=True`) it normalises with batch statistics and updates the moving averages with
    Keras's momentum; otherwise it uses the moving statistics. Frozen backbone parts are always
    called with train=False (current Keras semantics for a non-trainable BatchNorm).
    """

    def __init__(self, name, channels, epsilon=1e-3, momentum=0.99, scale=True, center=True,
                 *, rngs: nnx.Rngs | None = None):
        self.name = name
        self.epsilon = epsilon
        self.momentum = momentum
        self.gamma = nnx.Param(_ones((channels,))) if scale else None
        self.beta = nnx.Param(_zeros((channels,))) if center else None
        self.moving_mean = nnx.BatchStat(_zeros((channels,)))
        self.moving_variance = nnx.BatchStat(_ones((channels,)))

    def __call__(self, x, train: bool = False):
        if train:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(x, axes)
            var = jnp.var(x, axes)
            m = self.momentum
            self.moving_mean[...] = m * self.moving_mean[...] + (1 - m) * jax.lax.stop_gradient(mean)
            self.moving_variance[...] = m * self.moving_variance[...] + (1 - m) * jax.lax.stop_gradient(var)
        else:
            mean, var = self.moving_mean[...], self.moving_variance[...]
        inv = jax.lax.rsqrt(var + self.epsilon)
        if self.gamma is not None:
            inv = inv * self.gamma[...]
        y = (x - mean) * inv
        if self.beta is not None:
            y = y + self.beta[...]
        return y

    def keras_weights(self):
        w = []
        if self.gamma is not None:
            w.append(self.gamma)
        if self.beta is not None:
            w.append(self.beta)
        return w + [self.moving_mean, self.moving_variance]


class Dense(KerasLayer):
    def __init__(self, name, in_features, units, use_bias=True, *, rngs: nnx.Rngs):
        self.name = name
        self.kernel = nnx.Param(_glorot(rngs, (in_features, units)))
        self.bias = nnx.Param(_zeros((units,))) if use_bias else None

    def __call__(self, x):
        y = x @ self.kernel[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y

    def keras_weights(self):
        return [self.kernel] + ([self.bias] if self.bias is not None else [])


def max_pool(x, size=2, strides=None, padding="valid"):
    strides = strides or size
    return nnx.max_pool(x, (size, size), (strides, strides), padding.upper())


def avg_pool(x, size=2, strides=None, padding="valid"):
    """Keras AveragePooling2D: with "same" padding, the padded cells are excluded from the mean."""
    strides = strides or size
    return nnx.avg_pool(x, (size, size), (strides, strides), padding.upper(),
                        count_include_pad=False)


def zero_pad(x, pad):
    """Keras ZeroPadding2D: pad = int, ((top, bottom), (left, right))."""
    if isinstance(pad, int):
        pad = ((pad, pad), (pad, pad))
    return jnp.pad(x, ((0, 0), pad[0], pad[1], (0, 0)))


def keras_layers(model: nnx.Module) -> dict[str, KerasLayer]:
    """All KerasLayers of a model by Keras layer name (graph traversal order is NOT Keras order;
    ports give the order explicitly, see weights.py)."""
    return {m.name: m for _, m in nnx.iter_graph(model) if isinstance(m, KerasLayer)}


def count_params(layers) -> int:
    return int(sum(np.prod(v[...].shape) for l in layers for v in l.keras_weights()))

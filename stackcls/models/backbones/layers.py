"""Keras-equivalent layers in Flax NNX.

Each layer carries the name of the Keras layer it mirrors and lists its variables in the order
Keras stores them (`keras_weights()`, with the names Keras may give them in `keras_weight_names()`),
so one generic loader (weights.py) fills any backbone from a Keras weight file without per-model
guesswork. Layouts follow Keras: NHWC activations, HWIO kernels, depthwise kernels (kh, kw, C, 1).

Padding: Keras "same" with stride 2 pads asymmetrically (more on the bottom/right), exactly like
lax's "SAME", so we pass the string through.

Depthwise convolutions: XLA:CPU runs `feature_group_count` convolutions far below their arithmetic
cost, so on CPU `depthwise_conv` computes the same sum as kh*kw shifted multiply-adds over the
padded input (stride 2 via strided slices). Same numbers up to float summation order; several
times faster on CPU (benchmarks/backbones.py). GPUs keep the grouped convolution (cuDNN). Thin
spatial convolutions (MobileNet's 3x3x3 -> 8 stem) are computed the same way on CPU (`_few_taps`).
"""

from __future__ import annotations

import itertools
import os
import weakref

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_DN = ("NHWC", "HWIO", "NHWC")

# Creation order of every KerasLayer, kept outside the modules: a static attribute would make the
# graphdefs of two instances of one architecture differ and force a recompile per instance.
_CREATED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_COUNTER = itertools.count()


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _zeros(shape):
    return jax.device_put(np.zeros(shape, np.float32))  # host-side: no program per shape


def _ones(shape):
    return jax.device_put(np.ones(shape, np.float32))


def _host_rng(rngs: nnx.Rngs) -> np.random.Generator:
    # Initial values are drawn with numpy from a seed taken off the nnx key stream: jax.random
    # would compile one kernel per distinct shape (~30 s for a backbone on a busy 2-core CPU).
    key = jax.random.key_data(rngs.params())
    if isinstance(key, jax.core.Tracer):     # under nnx.eval_shape only the shapes are wanted
        return np.random.default_rng(0)
    return np.random.default_rng(np.asarray(key).ravel())


def _fans(shape):
    receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    return shape[-2] * receptive, shape[-1] * receptive


def _glorot(rngs: nnx.Rngs, shape):
    """Keras's default kernel initializer (glorot_uniform)."""
    fan_in, fan_out = _fans(shape)
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return jax.device_put(_host_rng(rngs).uniform(-limit, limit, shape).astype(np.float32))


def _he(rngs: nnx.Rngs, shape):
    """he_normal (truncated normal, std sqrt(2 / fan_in)), for layers trained from scratch."""
    fan_in, _ = _fans(shape)
    std = np.sqrt(2.0 / fan_in) / 0.87962566103423978
    v = _host_rng(rngs).standard_normal(shape)
    while np.any(bad := np.abs(v) > 2):  # resample outside 2 std, as truncated_normal does
        v[bad] = _host_rng(rngs).standard_normal(int(bad.sum()))
    return jax.device_put((v * std).astype(np.float32))


class KerasLayer(nnx.Module):
    """Base class: a layer with weights that maps 1:1 to a Keras layer.

    Subclasses set `self.name` (the Keras layer name) and define `_weights()`: a list of
    (accepted Keras weight names, variable or None) in Keras storage order.
    """

    name: str

    def __init__(self, name: str):
        self.name = name
        _CREATED[self] = next(_COUNTER)

    def _weights(self) -> list[tuple[tuple[str, ...], nnx.Variable | None]]:
        raise NotImplementedError

    def keras_weights(self) -> list[nnx.Variable]:
        """Variables in the order Keras stores them."""
        return [v for _, v in self._weights() if v is not None]

    def keras_weight_names(self) -> list[tuple[str, ...]]:
        """For each entry of keras_weights(), the names a Keras file may use for it."""
        return [n for n, v in self._weights() if v is not None]


def creation_order(layers) -> list[KerasLayer]:
    """Sort KerasLayers by the order in which they were constructed."""
    layers = list(layers)
    missing = [l.name for l in layers if l not in _CREATED]
    if missing:
        raise RuntimeError(
            f"construction order unknown for layers {missing[:3]} (module rebuilt by "
            "nnx.merge/clone?); build the model with create() or define keras_order() explicitly")
    return sorted(layers, key=lambda l: _CREATED[l])


class Conv2D(KerasLayer):
    def __init__(self, name, in_ch, filters, kernel, strides=1, padding="same", use_bias=True,
                 dilation=1, *, rngs: nnx.Rngs):
        super().__init__(name)
        k = _pair(kernel)
        self.strides = _pair(strides)
        self.dilation = _pair(dilation)
        self.padding = padding.upper()
        self.kernel = nnx.Param(_glorot(rngs, (*k, in_ch, filters)))
        self.bias = nnx.Param(_zeros((filters,))) if use_bias else None

    def __call__(self, x):
        k = self.kernel[...].astype(x.dtype)
        if _few_taps(k, self.dilation):
            y = conv_shift(x, k, self.strides, self.padding)
        elif k.shape[:2] == (1, 1):
            # 1x1 conv (any padding: none needed) as a matmul over a strided subsample: same sum,
            # ~10-20% less CPU time than XLA:CPU's convolution (ResNet50V2 ratio 1.05 -> 1.12).
            sh, sw = self.strides
            y = jnp.einsum("nhwc,cf->nhwf", x[:, ::sh, ::sw], k[0, 0])
        else:
            y = jax.lax.conv_general_dilated(x, k, self.strides, self.padding,
                                             rhs_dilation=self.dilation, dimension_numbers=_DN)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y

    def _weights(self):
        return [(("kernel",), self.kernel), (("bias",), self.bias)]


# "auto": shifted multiply-adds on CPU, grouped convolution elsewhere. Override with the env var
# STACKCLS_DEPTHWISE=shift|grouped (read at trace time) for benchmarks and tests; "grouped" also
# keeps thin stems (`_few_taps`) on XLA's convolution.
DEPTHWISE_IMPL = os.environ.get("STACKCLS_DEPTHWISE", "auto")


def _same_pads(n, k, s):
    out = -(-n // s)
    total = max((out - 1) * s + k - n, 0)
    return (total // 2, total - total // 2), out


def depthwise_conv_grouped(x, kernel, strides, padding):
    """Depthwise convolution as a grouped convolution, kernel (kh, kw, C, 1)."""
    c = x.shape[-1]
    k = kernel.reshape(kernel.shape[0], kernel.shape[1], 1, c)
    return jax.lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=_DN,
                                        feature_group_count=c)


def _padded(x, kh: int, kw: int, strides, padding):
    """(x padded as the convolution pads it, output height, output width)."""
    h, w = x.shape[1:3]
    sh, sw = strides
    if padding == "SAME":
        (pt, pb), oh = _same_pads(h, kh, sh)
        (pl, pr), ow = _same_pads(w, kw, sw)
        return jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0))), oh, ow
    if padding == "VALID":
        return x, (h - kh) // sh + 1, (w - kw) // sw + 1
    raise ValueError(f"padding must be SAME or VALID, got {padding!r}")


def depthwise_conv_shift(x, kernel, strides, padding):
    """Depthwise convolution as a sum of kh*kw shifted, strided slices times per-channel taps."""
    n, c = x.shape[0], x.shape[3]
    kh, kw = kernel.shape[:2]
    sh, sw = strides
    x, oh, ow = _padded(x, kh, kw, strides, padding)
    taps = kernel[..., 0]
    y = None
    for i in range(kh):
        for j in range(kw):
            sl = jax.lax.slice(x, (0, i, j, 0), (n, i + sh * (oh - 1) + 1, j + sw * (ow - 1) + 1, c),
                               (1, sh, sw, 1))
            t = sl * taps[i, j]
            y = t if y is None else y + t
    return y


def _few_taps(kernel, dilation) -> bool:
    """Whether a convolution is cheaper as `conv_shift` here: on CPU, a spatial kernel whose
    output pixels need at most 256 multiply-adds each (MobileNet 0.25's 3x3x3 -> 8 stem).
    XLA:CPU runs such a thin convolution far below its arithmetic rate (that stem took a third of
    the trunk's time; about 3x faster as one fused loop). Wider ones (VGG's 3x3x3 -> 64 stem)
    measured slower that way. 1x1 convolutions stay matmuls: as multiply-adds XLA fused the
    preceding layer into every tap and the trunk got slower."""
    kh, kw, cin, cout = kernel.shape
    return (DEPTHWISE_IMPL != "grouped" and jax.default_backend() == "cpu"
            and tuple(dilation) == (1, 1) and kh * kw > 1 and kh * kw * cin * cout <= 256)


def conv_shift(x, kernel, strides, padding):
    """Convolution, kernel (kh, kw, Cin, F), as kh*kw*Cin shifted, strided slices of the padded
    input times the kernel's rows: one fused elementwise loop. The same sum as the convolution up
    to float summation order."""
    n, c = x.shape[0], x.shape[3]
    kh, kw = kernel.shape[:2]
    sh, sw = strides
    x, oh, ow = _padded(x, kh, kw, strides, padding)
    y = None
    for i in range(kh):
        for j in range(kw):
            sl = jax.lax.slice(x, (0, i, j, 0), (n, i + sh * (oh - 1) + 1, j + sw * (ow - 1) + 1, c),
                               (1, sh, sw, 1))
            for ci in range(c):
                t = sl[..., ci:ci + 1] * kernel[i, j, ci]
                y = t if y is None else y + t
    return y


def depthwise_conv(x, kernel, strides, padding):
    """Depthwise 2-D convolution (Keras DepthwiseConv2D, depth_multiplier 1), kernel (kh, kw, C, 1)."""
    if kernel.shape[-1] != 1:
        raise ValueError(f"only depth_multiplier 1 is supported, kernel shape {kernel.shape}")
    kernel = kernel.astype(x.dtype)
    impl = DEPTHWISE_IMPL
    if impl == "auto":
        impl = "shift" if jax.default_backend() == "cpu" else "grouped"
    if impl == "shift":
        return depthwise_conv_shift(x, kernel, tuple(strides), padding)
    return depthwise_conv_grouped(x, kernel, tuple(strides), padding)


class DepthwiseConv2D(KerasLayer):
    def __init__(self, name, channels, kernel=3, strides=1, padding="same", use_bias=True,
                 *, rngs: nnx.Rngs):
        super().__init__(name)
        k = _pair(kernel)
        self.strides = _pair(strides)
        self.padding = padding.upper()
        self.kernel = nnx.Param(_glorot(rngs, (*k, channels, 1)))
        self.bias = nnx.Param(_zeros((channels,))) if use_bias else None

    def __call__(self, x):
        y = depthwise_conv(x, self.kernel[...], self.strides, self.padding)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y

    def _weights(self):
        # Keras 2 files say depthwise_kernel, Keras 3 says kernel.
        return [(("depthwise_kernel", "kernel"), self.kernel), (("bias",), self.bias)]


class SeparableConv2D(KerasLayer):
    """Keras SeparableConv2D: depthwise (kh, kw, C, 1) then pointwise (1, 1, C, F), optional bias."""

    def __init__(self, name, in_ch, filters, kernel=3, strides=1, padding="same", use_bias=True,
                 *, rngs: nnx.Rngs):
        super().__init__(name)
        k = _pair(kernel)
        self.strides = _pair(strides)
        self.padding = padding.upper()
        self.depthwise_kernel = nnx.Param(_glorot(rngs, (*k, in_ch, 1)))
        self.pointwise_kernel = nnx.Param(_glorot(rngs, (1, 1, in_ch, filters)))
        self.bias = nnx.Param(_zeros((filters,))) if use_bias else None

    def __call__(self, x):
        y = depthwise_conv(x, self.depthwise_kernel[...], self.strides, self.padding)
        y = jnp.einsum("nhwc,cf->nhwf", y, self.pointwise_kernel[...][0, 0].astype(y.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y

    def _weights(self):
        return [(("depthwise_kernel",), self.depthwise_kernel),
                (("pointwise_kernel",), self.pointwise_kernel), (("bias",), self.bias)]


class BatchNorm(KerasLayer):
    """Keras BatchNormalization over the last axis.

    Keras stores [gamma (if scale), beta (if center), moving_mean, moving_variance]. In training
    mode (`train=True`) it normalises with batch statistics (biased variance, as Keras) and updates
    the moving averages with Keras's momentum; otherwise it uses the moving statistics. Frozen
    backbone parts are always called with train=False (current Keras semantics for a
    non-trainable BatchNorm; Keras 2 used batch statistics there, we do not).
    """

    def __init__(self, name, channels, epsilon=1e-3, momentum=0.99, scale=True, center=True,
                 *, rngs: nnx.Rngs | None = None):
        super().__init__(name)
        self.epsilon = epsilon
        self.momentum = momentum
        self.gamma = nnx.Param(_ones((channels,))) if scale else None
        self.beta = nnx.Param(_zeros((channels,))) if center else None
        self.moving_mean = nnx.BatchStat(_zeros((channels,)))
        self.moving_variance = nnx.BatchStat(_ones((channels,)))

    def __call__(self, x, train: bool = False):
        if train:
            axes = tuple(range(x.ndim - 1))
            xf = x.astype(jnp.float32)
            mean = jnp.mean(xf, axes)
            var = jnp.var(xf, axes)
            m = self.momentum
            self.moving_mean[...] = m * self.moving_mean[...] + (1 - m) * jax.lax.stop_gradient(mean)
            self.moving_variance[...] = (m * self.moving_variance[...]
                                         + (1 - m) * jax.lax.stop_gradient(var))
        else:
            mean, var = self.moving_mean[...], self.moving_variance[...]
        # Fold into one scale and shift: two elementwise ops on the big tensor instead of four.
        inv = jax.lax.rsqrt(var + self.epsilon)
        if self.gamma is not None:
            inv = inv * self.gamma[...]
        shift = -mean * inv
        if self.beta is not None:
            shift = shift + self.beta[...]
        return x * inv.astype(x.dtype) + shift.astype(x.dtype)

    def _weights(self):
        return [(("gamma",), self.gamma), (("beta",), self.beta),
                (("moving_mean",), self.moving_mean), (("moving_variance",), self.moving_variance)]


class Dense(KerasLayer):
    def __init__(self, name, in_features, units, use_bias=True, *, rngs: nnx.Rngs):
        super().__init__(name)
        self.kernel = nnx.Param(_glorot(rngs, (in_features, units)))
        self.bias = nnx.Param(_zeros((units,))) if use_bias else None

    def __call__(self, x):
        y = x @ self.kernel[...].astype(x.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y

    def _weights(self):
        return [(("kernel",), self.kernel), (("bias",), self.bias)]


def max_pool(x, size=2, strides=None, padding="valid"):
    size = _pair(size)
    strides = _pair(strides) if strides is not None else size
    return nnx.max_pool(x, size, strides, padding.upper())


def avg_pool(x, size=2, strides=None, padding="valid"):
    """Keras AveragePooling2D: with "same" padding, the padded cells are excluded from the mean."""
    size = _pair(size)
    strides = _pair(strides) if strides is not None else size
    return nnx.avg_pool(x, size, strides, padding.upper(), count_include_pad=False)


def zero_pad(x, pad):
    """Keras ZeroPadding2D: pad = int, ((top, bottom), (left, right))."""
    if isinstance(pad, int):
        pad = ((pad, pad), (pad, pad))
    return jnp.pad(x, ((0, 0), tuple(pad[0]), tuple(pad[1]), (0, 0)))


def correct_pad(x, kernel=3):
    """Keras imagenet_utils.correct_pad: the ZeroPadding2D before a stride-2 "valid" conv."""
    k = _pair(kernel)
    adjust = (1 - x.shape[1] % 2, 1 - x.shape[2] % 2)
    c = (k[0] // 2, k[1] // 2)
    return ((c[0] - adjust[0], c[0]), (c[1] - adjust[1], c[1]))


def relu6(x):
    return jnp.clip(x, 0, 6)


def keras_layers(model: nnx.Module) -> dict[str, KerasLayer]:
    """All KerasLayers of a model by Keras layer name (graph traversal order is NOT Keras order;
    see Backbone.keras_order)."""
    out = {}
    for _, m in nnx.iter_graph(model):
        if isinstance(m, KerasLayer):
            if m.name in out and out[m.name] is not m:
                raise ValueError(f"two layers named {m.name!r} in {type(model).__name__}")
            out[m.name] = m
    return out


def count_params(layers, trainable_only=False) -> int:
    n = 0
    for l in layers:
        for v in l.keras_weights():
            if trainable_only and not isinstance(v, nnx.Param):
                continue
            n += int(np.prod(v[...].shape))
    return n

"""The single-slice classifier: a backbone, then the paper's head.

    image (S, H, W, 3) RGB 0..255 -> preprocess_input -> backbone.trunk -> backbone.last_block
    -> global average pooling -> Dense 256 ReLU -> Dropout 0.5 -> Dense 3 (logits; softmax outside)

The split into trunk / last_block is what makes training cheap: depth 0 trains the head on cached
pooled features, depth 1 trains `backbone.block_last` + head on cached trunk outputs (see train.py).
Dropout takes an explicit PRNG key (None = inference) so every training function stays pure and
vmappable over the folds x learning rates of a sweep.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from stackcls.backbones.layers import Dense

N_CLASSES = 3
HIDDEN = 256
DROPOUT = 0.5



def preprocess_input(x: jax.Array, mode: str | None) -> jax.Array:
    """The backbone's Keras `preprocess_input` on RGB 0..255 input ("none": unchanged)."""
    if mode in (None, "none"):
        return jnp.asarray(x, jnp.float32)
    from stackcls.backbones.preprocessing import preprocess_input as keras_preprocess
    return keras_preprocess(x, mode)


def gap(feature_map: jax.Array) -> jax.Array:
    """Global average pooling over H, W of an NHWC map."""
    return jnp.mean(feature_map, axis=(1, 2))


class Head(nnx.Module):
    """GAP features (N, D) -> Dense 256 ReLU -> Dropout 0.5 -> Dense 3 logits (Keras names)."""

    def __init__(self, in_features: int, *, rngs: nnx.Rngs):
        self.dense = Dense("dense", in_features, HIDDEN, rngs=rngs)
        self.logits = Dense("dense_1", HIDDEN, N_CLASSES, rngs=rngs)

    def penultimate(self, f: jax.Array) -> jax.Array:
        return jax.nn.relu(self.dense(f))

    def __call__(self, f: jax.Array, key: jax.Array | None = None) -> jax.Array:
        h = self.penultimate(f)
        if key is not None:  # training: inverted dropout, as Keras
            keep = jax.random.bernoulli(key, 1.0 - DROPOUT, h.shape)
            h = jnp.where(keep, h / (1.0 - DROPOUT), 0.0)
        return self.logits(h)


class Classifier(nnx.Module):
    """Backbone + head. `x` everywhere is the model input: (N, H, W, 3) RGB in 0..255."""

    def __init__(self, backbone: nnx.Module, feature_dim: int, *, rngs: nnx.Rngs):
        self.backbone = backbone
        self.head = Head(feature_dim, rngs=rngs)

    @property
    def preprocess_mode(self) -> str:
        return getattr(self.backbone, "preprocess", "none")

    def trunk(self, x, train: bool = False):
        xp = preprocess_input(x, self.preprocess_mode)
        return self.backbone.trunk(xp, train=train)

    def feature_map(self, x, train: bool = False) -> jax.Array:
        """Output of the last convolutional block (the Grad-CAM target)."""
        return self.backbone.last_block(self.trunk(x, train), train=train)

    def features(self, x, train: bool = False) -> jax.Array:
        return gap(self.feature_map(x, train))

    def penultimate(self, x) -> jax.Array:
        return self.head.penultimate(self.features(x))

    def __call__(self, x, train: bool = False, key: jax.Array | None = None) -> jax.Array:
        return self.head(self.features(x, train), key)


def feature_dim(backbone: nnx.Module, input_size: int) -> int:
    """Channels of the last block's output, found by shape inference (no FLOPs spent)."""
    x = jax.ShapeDtypeStruct((1, input_size, input_size, 3), jnp.float32)
    graphdef, state = nnx.split(backbone)

    def f(state, x):
        m = nnx.merge(graphdef, state)
        return m.last_block(m.trunk(x))

    out = jax.eval_shape(f, state, x)
    return int(out.shape[-1])


def build_classifier(backbone: nnx.Module, input_size: int, seed: int = 0) -> Classifier:
    return Classifier(backbone, feature_dim(backbone, input_size), rngs=nnx.Rngs(seed))

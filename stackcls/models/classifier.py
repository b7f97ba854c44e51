"""The single-slice classifier: a backbone, then the paper's head.

    image (S, H, W, 3) RGB 0..255 -> preprocess_input -> backbone.trunk -> backbone.last_block
    -> global average pooling -> Dense 256 ReLU -> Dropout 0.5 -> Dense 3 (logits; softmax outside)

The split into trunk / last_block is what makes training cheap. A training "stage" says what a
sample is when it reaches the model (engine.py trains each):

    "features"  pooled last-block output, cached once; only the head trains        (depth 0)
    "carry"     trunk output, cached once; `backbone.block_last` and the head train  (depth 1)
    "image"     the model input; everything trains                                  (CBR, scratch)

`stage_features` maps a stage's samples to the head's input and `trainable_filter` picks what a
stage trains. Dropout takes an explicit PRNG key (None = inference) so every training function
stays pure and vmappable over the folds x learning rates of a sweep.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stackcls.models import backbones
from stackcls.models.backbones.layers import Dense
from stackcls.models.backbones.preprocessing import preprocess_input as keras_preprocess
from stackcls.preprocess.arrays import to_model_input

N_CLASSES = 3
HIDDEN = 256
DROPOUT = 0.5
STAGES = ("features", "carry", "image")


def preprocess_input(x: jax.Array, mode: str | None) -> jax.Array:
    """The backbone's Keras `preprocess_input` on RGB 0..255 input ("none": unchanged)."""
    if mode in (None, "none"):
        return jnp.asarray(x, jnp.float32)
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

    def pooled(self, carry, train: bool = False) -> jax.Array:
        """Last block + global average pooling on a trunk output: the head's input."""
        return gap(self.backbone.last_block(carry, train=train))

    def features(self, x, train: bool = False) -> jax.Array:
        return self.pooled(self.trunk(x, train), train)

    def stage_features(self, inputs, stage: str, train: bool = False) -> jax.Array:
        """The head's input from samples of a training stage (see the module docstring)."""
        if stage == "features":
            return inputs
        if stage == "carry":
            # the last block's BatchNorm stays in inference mode even while it trains (frozen
            # statistics, trained gamma/beta: Keras's fine-tuning rule, as for every frozen layer)
            return self.pooled(inputs)
        if stage == "image":
            return self.features(inputs, train)
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")

    def penultimate(self, x) -> jax.Array:
        return self.head.penultimate(self.features(x))

    def __call__(self, x, train: bool = False, key: jax.Array | None = None) -> jax.Array:
        return self.head(self.features(x, train), key)


def trainable_filter(stage: str):
    """The variables a training stage updates (an nnx filter); the rest stay frozen."""
    head = nnx.PathContains("head")
    if stage == "features":
        return nnx.All(nnx.Param, head)
    if stage == "carry":
        return nnx.All(nnx.Param, nnx.Any(head, nnx.PathContains("block_last")))
    if stage == "image":
        return nnx.Param
    raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")


def feature_dim(backbone: nnx.Module, input_size: int | None = None) -> int:
    """Channels D of the last block's output (the head's input), by shape inference (no FLOPs
    spent); input_size defaults to the backbone's own."""
    size = int(input_size or backbone.input_size)
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    graphdef, state = nnx.split(backbone)

    def f(state, x):
        m = nnx.merge(graphdef, state)
        return m.last_block(m.trunk(x))

    out = jax.eval_shape(f, state, x)
    return int(out.shape[-1])


def build_classifier(backbone: nnx.Module, input_size: int, seed: int = 0) -> Classifier:
    return Classifier(backbone, feature_dim(backbone, input_size), rngs=nnx.Rngs(seed))


def rebuild(config: dict) -> Classifier:
    """An untrained classifier with the architecture a config describes."""
    bb = backbones.create(config["backbone"], weights=None, input_size=int(config["input_size"]),
                          **config.get("options", {}))
    return build_classifier(bb, int(config["input_size"]))


@dataclasses.dataclass
class TrainedModel:
    """A trained single-slice classifier (+ optional stack head), ready for `predict_stack`.

    preprocess(images (S, H, W)) -> model input (S, size, size, 3) (window, crop, resize).
    slice_outputs(x) -> (penultimate (S, 256), probs (S, 3)); pure and jitted, so it composes
    into a larger jit.
    """

    model: Classifier
    config: dict
    stack_head: object = None      # stackcls.models.stack_head.StackModel
    path: Path | None = None
    direction: object = None       # DirectionModel, for stacks of unknown orientation
    calibration: object = None     # Calibration: temperatures of the range probabilities

    def __post_init__(self):
        graphdef, state = nnx.split(self.model)
        self._state = state

        @jax.jit
        def outputs(state, x):
            m = nnx.merge(graphdef, state, copy=True)
            pen = m.head.penultimate(m.features(jnp.asarray(x, jnp.float32)))
            return pen, jax.nn.softmax(m.head.logits(pen), axis=-1)

        self._outputs = outputs

    @property
    def input_size(self) -> int:
        return int(self.config["input_size"])

    def preprocess(self, images, spacing=None) -> np.ndarray:
        """The paper's input: a fixed fraction of the pixels, whatever their size (spacing unused)."""
        return to_model_input(images, self.input_size, keep=float(self.config.get("keep", 0.6)))

    def slice_outputs(self, x):
        return self._outputs(self._state, x)

    def logits(self, x):
        return self.model(jnp.asarray(x, jnp.float32))

"""DenseNet121 (Huang et al. 2017, "Densely Connected Convolutional Networks"), as
`keras.applications.DenseNet121(include_top=False)` builds it (keras/src/applications/densenet.py).

Four dense blocks of 6, 12, 24, 16 conv blocks (BN-ReLU-1x1 conv-BN-ReLU-3x3 conv, each adding 32
channels by concatenation), joined by transition blocks (BN-ReLU-1x1 conv halving the channels,
2x2 average pool), then a final BN-ReLU. Layer names are Keras's; `ordered_layers()` lists the
weight-bearing layers in Keras `model.layers` order, which is the order of the legacy .h5 files.
Last convolutional block (what depth-1 training fine-tunes): the conv5 dense block and the
final `bn`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from stackcls.models.backbones.base import Backbone, BackboneSpec
from stackcls.models.backbones.download import keras_file
from stackcls.models.backbones.layers import BatchNorm, Conv2D, KerasLayer, avg_pool, max_pool, zero_pad

EPS = 1.001e-5  # Keras uses this epsilon for every DenseNet BN
GROWTH = 32
BLOCKS = (6, 12, 24, 16)  # DenseNet121


class ConvBlock(nnx.Module):
    """keras densenet.conv_block: returns only the 32 new channels; the caller concatenates."""

    def __init__(self, name: str, in_ch: int, *, rngs: nnx.Rngs):
        self.name = name
        self.bn_0 = BatchNorm(f"{name}_0_bn", in_ch, epsilon=EPS)
        self.conv_1 = Conv2D(f"{name}_1_conv", in_ch, 4 * GROWTH, 1, padding="valid",
                             use_bias=False, rngs=rngs)
        self.bn_1 = BatchNorm(f"{name}_1_bn", 4 * GROWTH, epsilon=EPS)
        self.conv_2 = Conv2D(f"{name}_2_conv", 4 * GROWTH, GROWTH, 3, padding="same",
                             use_bias=False, rngs=rngs)

    def __call__(self, x, train: bool = False):
        y = self.conv_1(jax.nn.relu(self.bn_0(x, train)))
        return self.conv_2(jax.nn.relu(self.bn_1(y, train)))

    def ordered_layers(self) -> list[KerasLayer]:
        return [self.bn_0, self.conv_1, self.bn_1, self.conv_2]


class DenseBlock(nnx.Module):
    """keras densenet.dense_block: x <- concat([x, conv_block(x)]) `n` times ({name}_block{i}_concat)."""

    def __init__(self, name: str, in_ch: int, n: int, *, rngs: nnx.Rngs):
        self.name = name
        self.layers = nnx.List([ConvBlock(f"{name}_block{i + 1}", in_ch + i * GROWTH, rngs=rngs)
                                for i in range(n)])
        self.out_ch = in_ch + n * GROWTH

    def __call__(self, x, train: bool = False):
        for layer in self.layers:
            x = jnp.concatenate([x, layer(x, train)], axis=-1)
        return x

    def ordered_layers(self) -> list[KerasLayer]:
        return [l for layer in self.layers for l in layer.ordered_layers()]


class TransitionBlock(nnx.Module):
    """keras densenet.transition_block with reduction 0.5."""

    def __init__(self, name: str, in_ch: int, *, rngs: nnx.Rngs):
        self.name = name
        self.bn = BatchNorm(f"{name}_bn", in_ch, epsilon=EPS)
        self.conv = Conv2D(f"{name}_conv", in_ch, int(in_ch * 0.5), 1, padding="valid",
                           use_bias=False, rngs=rngs)
        self.out_ch = int(in_ch * 0.5)

    def __call__(self, x, train: bool = False):
        return avg_pool(self.conv(jax.nn.relu(self.bn(x, train))), 2, 2)  # {name}_pool

    def ordered_layers(self) -> list[KerasLayer]:
        return [self.bn, self.conv]


class LastBlock(nnx.Module):
    """conv5 dense block -> bn -> ReLU: what depth-1 training unfreezes."""

    def __init__(self, in_ch: int, *, rngs: nnx.Rngs):
        self.conv5 = DenseBlock("conv5", in_ch, BLOCKS[3], rngs=rngs)
        self.bn = BatchNorm("bn", self.conv5.out_ch, epsilon=EPS)

    def __call__(self, x, train: bool = False):
        return jax.nn.relu(self.bn(self.conv5(x, train), train))  # relu

    def ordered_layers(self) -> list[KerasLayer]:
        return self.conv5.ordered_layers() + [self.bn]


class DenseNet121(Backbone):
    """Input: (N, H, W, 3) after Keras "torch" preprocessing (x / 255, ImageNet mean/std).
    Output (N, h, w, 1024)."""

    preprocess = "torch"

    def __init__(self, input_size: int, *, rngs: nnx.Rngs):
        self.input_size = input_size
        self.conv1_conv = Conv2D("conv1_conv", 3, 64, 7, strides=2, padding="valid",
                                 use_bias=False, rngs=rngs)
        self.conv1_bn = BatchNorm("conv1_bn", 64, epsilon=EPS)
        ch = 64
        self.conv2 = DenseBlock("conv2", ch, BLOCKS[0], rngs=rngs)
        self.pool2 = TransitionBlock("pool2", self.conv2.out_ch, rngs=rngs)
        self.conv3 = DenseBlock("conv3", self.pool2.out_ch, BLOCKS[1], rngs=rngs)
        self.pool3 = TransitionBlock("pool3", self.conv3.out_ch, rngs=rngs)
        self.conv4 = DenseBlock("conv4", self.pool3.out_ch, BLOCKS[2], rngs=rngs)
        self.pool4 = TransitionBlock("pool4", self.conv4.out_ch, rngs=rngs)
        self.block_last = LastBlock(self.pool4.out_ch, rngs=rngs)

    def trunk(self, x, train: bool = False):
        """Preprocessed images -> pool4 output, the input of the conv5 dense block."""
        x = self.conv1_conv(zero_pad(x, 3))
        x = jax.nn.relu(self.conv1_bn(x, train))  # conv1_relu
        x = max_pool(zero_pad(x, 1), 3, 2)  # pool1 (after ReLU, so zero padding is harmless)
        x = self.pool2(self.conv2(x, train), train)
        x = self.pool3(self.conv3(x, train), train)
        return self.pool4(self.conv4(x, train), train)

    def last_block(self, carry, train: bool = False):
        return self.block_last(carry, train)

    def ordered_layers(self) -> list[KerasLayer]:
        out: list[KerasLayer] = [self.conv1_conv, self.conv1_bn]
        for m in (self.conv2, self.pool2, self.conv3, self.pool3, self.conv4, self.pool4):
            out += m.ordered_layers()
        return out + self.block_last.ordered_layers()

    def keras_order(self) -> list[str]:
        # Explicit (structural) order: does not depend on construction order, survives nnx.merge.
        return [layer.name for layer in self.ordered_layers()]


SPECS = (BackboneSpec("densenet121", DenseNet121, 224, pretrained=(keras_file(
    "densenet/densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "30ee3e1110167f948a6b9946edeeb738"),), doc="DenseNet121, 1024 features"),)

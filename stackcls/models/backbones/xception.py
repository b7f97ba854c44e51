"""Xception (Chollet 2017, "Xception: Deep Learning with Depthwise Separable Convolutions"), as
`keras.applications.Xception(include_top=False)` builds it (keras/src/applications/xception.py).

Entry flow (block1 convs; blocks 2-4 of two separable convs + strided max-pool with a strided 1x1
conv shortcut), middle flow (blocks 5-12: three ReLU-sepconv-BN with identity shortcut), exit flow
(block13 like the entry blocks, block14 two sepconv-BN-ReLU without shortcut). Minimum input 71 px.

Layer names are Keras's. Keras leaves the four shortcut convs and their BNs unnamed, so their names
depend on how many layers Keras had created before; we use the names of a fresh Keras 3 process
(conv2d, conv2d_1.., batch_normalization, batch_normalization_1..). Weight files are matched by
Keras layer order (`ordered_layers()`), as Keras's own legacy loader does, not by these names.
Last convolutional block (what depth-1 training fine-tunes): block14.
"""

from __future__ import annotations

import jax
from flax import nnx

from stackcls.models.backbones.base import Backbone, BackboneSpec
from stackcls.models.backbones.download import keras_file
from stackcls.models.backbones.layers import BatchNorm, Conv2D, KerasLayer, SeparableConv2D, max_pool


class EntryBlock(nnx.Module):
    """Blocks 2, 3, 4, 13: [ReLU] sepconv-BN-ReLU-sepconv-BN, 3x3/2 max-pool, + 1x1/2 conv-BN of x.

    block2 starts without the ReLU (its input is already block1_conv2_act's output).
    """

    def __init__(self, prefix: str, index: int, in_ch: int, f1: int, f2: int, first_act: bool,
                 *, rngs: nnx.Rngs):
        self.name = prefix
        self.first_act = first_act
        suffix = f"_{index}" if index else ""
        self.residual_conv = Conv2D(f"conv2d{suffix}", in_ch, f2, 1, strides=2, padding="same",
                                    use_bias=False, rngs=rngs)
        self.residual_bn = BatchNorm(f"batch_normalization{suffix}", f2)
        self.sepconv1 = SeparableConv2D(f"{prefix}_sepconv1", in_ch, f1, 3, use_bias=False,
                                        rngs=rngs)
        self.sepconv1_bn = BatchNorm(f"{prefix}_sepconv1_bn", f1)
        self.sepconv2 = SeparableConv2D(f"{prefix}_sepconv2", f1, f2, 3, use_bias=False,
                                        rngs=rngs)
        self.sepconv2_bn = BatchNorm(f"{prefix}_sepconv2_bn", f2)

    def __call__(self, x, train: bool = False):
        residual = self.residual_bn(self.residual_conv(x), train)
        y = jax.nn.relu(x) if self.first_act else x  # {prefix}_sepconv1_act
        y = jax.nn.relu(self.sepconv1_bn(self.sepconv1(y), train))  # {prefix}_sepconv2_act
        y = self.sepconv2_bn(self.sepconv2(y), train)
        return max_pool(y, 3, 2, "same") + residual  # {prefix}_pool, add

    def ordered_layers(self) -> list[KerasLayer]:
        return [self.sepconv1, self.sepconv1_bn, self.sepconv2, self.sepconv2_bn,
                self.residual_conv, self.residual_bn]


class MiddleBlock(nnx.Module):
    """Blocks 5-12: 3 x (ReLU-sepconv-BN), 728 channels, identity shortcut."""

    def __init__(self, prefix: str, *, rngs: nnx.Rngs):
        self.name = prefix
        self.sepconv1 = SeparableConv2D(f"{prefix}_sepconv1", 728, 728, 3, use_bias=False, rngs=rngs)
        self.sepconv1_bn = BatchNorm(f"{prefix}_sepconv1_bn", 728)
        self.sepconv2 = SeparableConv2D(f"{prefix}_sepconv2", 728, 728, 3, use_bias=False, rngs=rngs)
        self.sepconv2_bn = BatchNorm(f"{prefix}_sepconv2_bn", 728)
        self.sepconv3 = SeparableConv2D(f"{prefix}_sepconv3", 728, 728, 3, use_bias=False, rngs=rngs)
        self.sepconv3_bn = BatchNorm(f"{prefix}_sepconv3_bn", 728)

    def __call__(self, x, train: bool = False):
        y = self.sepconv1_bn(self.sepconv1(jax.nn.relu(x)), train)
        y = self.sepconv2_bn(self.sepconv2(jax.nn.relu(y)), train)
        y = self.sepconv3_bn(self.sepconv3(jax.nn.relu(y)), train)
        return y + x

    def ordered_layers(self) -> list[KerasLayer]:
        return [self.sepconv1, self.sepconv1_bn, self.sepconv2, self.sepconv2_bn,
                self.sepconv3, self.sepconv3_bn]


class Block14(nnx.Module):
    """Exit flow end: sepconv(1536)-BN-ReLU-sepconv(2048)-BN-ReLU. What depth-1 training unfreezes."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.name = "block14"
        self.sepconv1 = SeparableConv2D("block14_sepconv1", 1024, 1536, 3, use_bias=False, rngs=rngs)
        self.sepconv1_bn = BatchNorm("block14_sepconv1_bn", 1536)
        self.sepconv2 = SeparableConv2D("block14_sepconv2", 1536, 2048, 3, use_bias=False, rngs=rngs)
        self.sepconv2_bn = BatchNorm("block14_sepconv2_bn", 2048)

    def __call__(self, x, train: bool = False):
        y = jax.nn.relu(self.sepconv1_bn(self.sepconv1(x), train))  # block14_sepconv1_act
        return jax.nn.relu(self.sepconv2_bn(self.sepconv2(y), train))  # block14_sepconv2_act

    def ordered_layers(self) -> list[KerasLayer]:
        return [self.sepconv1, self.sepconv1_bn, self.sepconv2, self.sepconv2_bn]


class Xception(Backbone):
    """Input: (N, H, W, 3), H, W >= 71, after Keras "tf" preprocessing (x / 127.5 - 1).
    Output (N, h, w, 2048)."""

    preprocess = "tf"

    def __init__(self, input_size: int, *, rngs: nnx.Rngs):
        self.input_size = input_size
        self.block1_conv1 = Conv2D("block1_conv1", 3, 32, 3, strides=2, padding="valid",
                                   use_bias=False, rngs=rngs)
        self.block1_conv1_bn = BatchNorm("block1_conv1_bn", 32)
        self.block1_conv2 = Conv2D("block1_conv2", 32, 64, 3, padding="valid", use_bias=False,
                                   rngs=rngs)
        self.block1_conv2_bn = BatchNorm("block1_conv2_bn", 64)
        self.block2 = EntryBlock("block2", 0, 64, 128, 128, first_act=False, rngs=rngs)
        self.block3 = EntryBlock("block3", 1, 128, 256, 256, first_act=True, rngs=rngs)
        self.block4 = EntryBlock("block4", 2, 256, 728, 728, first_act=True, rngs=rngs)
        self.middle = nnx.List([MiddleBlock(f"block{i}", rngs=rngs) for i in range(5, 13)])
        self.block13 = EntryBlock("block13", 3, 728, 728, 1024, first_act=True, rngs=rngs)
        self.block_last = Block14(rngs=rngs)

    def trunk(self, x, train: bool = False):
        """Preprocessed images -> block13 output (after its add), the input of block14."""
        x = jax.nn.relu(self.block1_conv1_bn(self.block1_conv1(x), train))  # block1_conv1_act
        x = jax.nn.relu(self.block1_conv2_bn(self.block1_conv2(x), train))  # block1_conv2_act
        x = self.block4(self.block3(self.block2(x, train), train), train)
        for block in self.middle:
            x = block(x, train)
        return self.block13(x, train)

    def last_block(self, carry, train: bool = False):
        return self.block_last(carry, train)

    def ordered_layers(self) -> list[KerasLayer]:
        out: list[KerasLayer] = [self.block1_conv1, self.block1_conv1_bn, self.block1_conv2,
                                 self.block1_conv2_bn]
        for block in (self.block2, self.block3, self.block4, *self.middle, self.block13,
                      self.block_last):
            out += block.ordered_layers()
        return out

    def keras_order(self) -> list[str]:
        # Explicit (structural) order: does not depend on construction order, survives nnx.merge.
        return [layer.name for layer in self.ordered_layers()]


SPECS = (BackboneSpec("xception", Xception, 299, min_size=71, pretrained=(keras_file(
    "xception/xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "b0042744bf5b25fce3cb969f33bebb97"),), doc="Xception, 2048 features, input >= 71 px"),)

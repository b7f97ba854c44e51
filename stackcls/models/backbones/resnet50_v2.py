"""ResNet50V2 (He et al. 2016, "Identity Mappings in Deep Residual Networks"), as
`keras.applications.ResNet50V2(include_top=False)` builds it (keras/src/applications/resnet.py).

Pre-activation residual blocks: BN -> ReLU comes first in each block, so the stem has no BN and the
network ends with `post_bn` -> ReLU. Layer names are Keras's; `ordered_layers()` lists the
weight-bearing layers in Keras `model.layers` order, which is the order of the legacy .h5 files.
Last convolutional block (what depth-1 training fine-tunes): conv5_block3 and post_bn.
"""

from __future__ import annotations

import jax
from flax import nnx

from stackcls.models.backbones.base import Backbone, BackboneSpec
from stackcls.models.backbones.download import keras_file
from stackcls.models.backbones.layers import BatchNorm, Conv2D, KerasLayer, max_pool, zero_pad

EPS = 1.001e-5  # Keras uses this epsilon for every BN of the ResNet family


class ResidualBlockV2(nnx.Module):
    """keras resnet.residual_block_v2: preact BN/ReLU, 1x1 -> 3x3 (stride) -> 1x1 (x4) bottleneck.

    The shortcut is a 1x1 conv of the pre-activation (first block of a stage), a stride-`stride`
    subsample of the raw input (Keras MaxPooling2D(1, strides) on the last block of a stage), or
    the identity.
    """

    def __init__(self, name: str, in_ch: int, filters: int, stride: int = 1,
                 conv_shortcut: bool = False, *, rngs: nnx.Rngs):
        self.name = name
        self.stride = stride
        self.preact_bn = BatchNorm(f"{name}_preact_bn", in_ch, epsilon=EPS)
        self.conv_0 = (Conv2D(f"{name}_0_conv", in_ch, 4 * filters, 1, strides=stride,
                              padding="valid", rngs=rngs) if conv_shortcut else None)
        self.conv_1 = Conv2D(f"{name}_1_conv", in_ch, filters, 1, padding="valid", use_bias=False,
                             rngs=rngs)
        self.bn_1 = BatchNorm(f"{name}_1_bn", filters, epsilon=EPS)
        self.conv_2 = Conv2D(f"{name}_2_conv", filters, filters, 3, strides=stride, padding="valid",
                             use_bias=False, rngs=rngs)
        self.bn_2 = BatchNorm(f"{name}_2_bn", filters, epsilon=EPS)
        self.conv_3 = Conv2D(f"{name}_3_conv", filters, 4 * filters, 1, padding="valid", rngs=rngs)

    def __call__(self, x, train: bool = False):
        preact = jax.nn.relu(self.preact_bn(x, train))
        if self.conv_0 is not None:
            shortcut = self.conv_0(preact)
        elif self.stride > 1:
            shortcut = x[:, :: self.stride, :: self.stride]  # == MaxPooling2D(1, strides=stride)
        else:
            shortcut = x
        y = jax.nn.relu(self.bn_1(self.conv_1(preact), train))
        y = zero_pad(y, 1)  # {name}_2_pad
        y = jax.nn.relu(self.bn_2(self.conv_2(y), train))
        return shortcut + self.conv_3(y)  # {name}_out

    def ordered_layers(self) -> list[KerasLayer]:
        # Keras's topological order puts the shortcut conv after the 3x3 branch.
        out = [self.preact_bn, self.conv_1, self.bn_1, self.conv_2, self.bn_2]
        if self.conv_0 is not None:
            out.append(self.conv_0)
        return out + [self.conv_3]


class LastBlock(nnx.Module):
    """conv5_block3 -> post_bn -> ReLU: what depth-1 training unfreezes."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv5_block3 = ResidualBlockV2("conv5_block3", 2048, 512, rngs=rngs)
        self.post_bn = BatchNorm("post_bn", 2048, epsilon=EPS)

    def __call__(self, x, train: bool = False):
        return jax.nn.relu(self.post_bn(self.conv5_block3(x, train), train))

    def ordered_layers(self) -> list[KerasLayer]:
        return self.conv5_block3.ordered_layers() + [self.post_bn]


# (stage name, bottleneck filters, blocks, stride of the stage's last block): resnet_v2.ResNet50V2
STAGES = (("conv2", 64, 3, 2), ("conv3", 128, 4, 2), ("conv4", 256, 6, 2), ("conv5", 512, 3, 1))


class ResNet50V2(Backbone):
    """Input: (N, H, W, 3) after Keras "tf" preprocessing (x / 127.5 - 1). Output (N, h, w, 2048)."""

    preprocess = "tf"

    def __init__(self, input_size: int, *, rngs: nnx.Rngs):
        self.input_size = input_size
        self.conv1_conv = Conv2D("conv1_conv", 3, 64, 7, strides=2, padding="valid", rngs=rngs)
        blocks, in_ch = [], 64
        for stage, filters, n, stride in STAGES:
            for i in range(1, n + 1):
                if stage == "conv5" and i == n:
                    break  # conv5_block3 lives in block_last
                blocks.append(ResidualBlockV2(f"{stage}_block{i}", in_ch, filters,
                                              stride=stride if i == n else 1,
                                              conv_shortcut=i == 1, rngs=rngs))
                in_ch = 4 * filters
        self.blocks = nnx.List(blocks)
        self.block_last = LastBlock(rngs=rngs)

    def trunk(self, x, train: bool = False):
        """Preprocessed images -> conv5_block2_out, the input of the last block."""
        x = self.conv1_conv(zero_pad(x, 3))  # conv1_pad
        x = max_pool(zero_pad(x, 1), 3, 2)  # pool1_pad, pool1_pool (zeros, as Keras pads)
        for block in self.blocks:
            x = block(x, train)
        return x

    def last_block(self, carry, train: bool = False):
        return self.block_last(carry, train)

    def ordered_layers(self) -> list[KerasLayer]:
        out: list[KerasLayer] = [self.conv1_conv]
        for block in self.blocks:
            out += block.ordered_layers()
        return out + self.block_last.ordered_layers()

    def keras_order(self) -> list[str]:
        # Explicit (structural) order: does not depend on construction order, survives nnx.merge.
        return [layer.name for layer in self.ordered_layers()]


SPECS = (BackboneSpec("resnet50_v2", ResNet50V2, 224, pretrained=(keras_file(
    "resnet/resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "fac2f116257151a9d068a22e544a4917"),), doc="ResNet50V2 (pre-activation), 2048 features"),)

"""MobileNetV2 (Sandler et al. 2018), as keras.applications.MobileNetV2 (include_top=False).

Last convolutional block (depth 1): block_16 (expand, depthwise, project + BNs) and Conv_1 /
Conv_1_bn.
"""

from __future__ import annotations

from flax import nnx

from stackcls.models.backbones.base import Backbone, BackboneSpec, Block
from stackcls.models.backbones.download import keras_file
from stackcls.models.backbones.layers import (BatchNorm, Conv2D, DepthwiseConv2D, correct_pad, relu6,
                                       zero_pad)

# (filters before alpha, stride, expansion) of blocks 0..16
_BLOCKS = [(16, 1, 1), (24, 2, 6), (24, 1, 6), (32, 2, 6), (32, 1, 6), (32, 1, 6), (64, 2, 6),
           (64, 1, 6), (64, 1, 6), (64, 1, 6), (96, 1, 6), (96, 1, 6), (96, 1, 6), (160, 2, 6),
           (160, 1, 6), (160, 1, 6), (320, 1, 6)]


def make_divisible(v, divisor=8, min_value=None):
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def _bn(name, c):
    return BatchNorm(name, c, epsilon=1e-3, momentum=0.999)


class _InvertedResidual(nnx.Module):
    def __init__(self, i, cin, filters, stride, expansion, alpha, rngs):
        cout = make_divisible(int(filters * alpha), 8)
        p = f"block_{i}_" if i else "expanded_conv_"
        self.stride = stride
        self.residual = cin == cout and stride == 1
        c = cin
        if i:
            c = expansion * cin
            self.expand = Conv2D(p + "expand", cin, c, 1, use_bias=False, rngs=rngs)
            self.expand_bn = _bn(p + "expand_BN", c)
        else:
            self.expand = None
        self.depthwise = DepthwiseConv2D(p + "depthwise", c, 3, stride,
                                         "same" if stride == 1 else "valid", use_bias=False,
                                         rngs=rngs)
        self.depthwise_bn = _bn(p + "depthwise_BN", c)
        self.project = Conv2D(p + "project", c, cout, 1, use_bias=False, rngs=rngs)
        self.project_bn = _bn(p + "project_BN", cout)
        self.cout = cout

    def __call__(self, inputs, train=False):
        x = inputs
        if self.expand is not None:
            x = relu6(self.expand_bn(self.expand(x), train))
        if self.stride == 2:
            x = zero_pad(x, correct_pad(x, 3))
        x = relu6(self.depthwise_bn(self.depthwise(x), train))
        x = self.project_bn(self.project(x), train)
        return inputs + x if self.residual else x


class MobileNetV2(Backbone):
    preprocess = "tf"

    def __init__(self, input_size, alpha, *, rngs: nnx.Rngs):
        self.input_size = input_size
        self.alpha = alpha
        c = make_divisible(32 * alpha, 8)
        self.conv1 = Conv2D("Conv1", 3, c, 3, 2, use_bias=False, rngs=rngs)
        self.conv1_bn = _bn("bn_Conv1", c)
        blocks = []
        for i, (f, s, e) in enumerate(_BLOCKS):
            blocks.append(_InvertedResidual(i, c, f, s, e, alpha, rngs))
            c = blocks[-1].cout
        last = make_divisible(1280 * alpha, 8) if alpha > 1.0 else 1280
        self.blocks = nnx.List(blocks[:-1])
        self.block_last = Block(
            block=blocks[-1],
            conv=Conv2D("Conv_1", c, last, 1, use_bias=False, rngs=rngs),
            bn=_bn("Conv_1_bn", last))

    def trunk(self, x, train=False):
        x = relu6(self.conv1_bn(self.conv1(x), train))
        for b in self.blocks:
            x = b(x, train)
        return x

    def last_block(self, x, train=False):
        b = self.block_last
        x = b.block(x, train)
        return relu6(b.bn(b.conv(x), train))


# keras.applications picks the file by alpha and rows. Keras publishes no hashes for them and
# we hold no copy: all 30 are unpinned (`verified` False; download.py checks they are Keras HDF5
# weight files and warns once with each one's sha256).
PRETRAINED = tuple(
    keras_file(f"mobilenet_v2/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{alpha}_{rows}"
               "_no_top.h5", alpha=alpha, rows=rows)
    for alpha in (0.35, 0.5, 0.75, 1.0, 1.3, 1.4) for rows in (96, 128, 160, 192, 224))

SPECS = (BackboneSpec("mobilenet_v2", MobileNetV2, 224, pretrained=PRETRAINED,
                      options={"alpha": 0.35}, doc="MobileNetV2, alpha 0.35 by default"),)

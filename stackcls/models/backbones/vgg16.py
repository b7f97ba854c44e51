"""VGG16 (Simonyan & Zisserman 2015), as keras.applications.VGG16 (include_top=False).

Last convolutional block (depth 1): block5_conv1..3 (+ block5_pool, no weights).
"""

from __future__ import annotations

import jax
from flax import nnx

from stackcls.models.backbones.base import Backbone, BackboneSpec, Block
from stackcls.models.backbones.download import keras_file
from stackcls.models.backbones.layers import Conv2D, max_pool

# filters and number of convolutions per block
_BLOCKS = [(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)]


def _convs(block, cin, filters, n, rngs):
    out = []
    for j in range(1, n + 1):
        out.append(Conv2D(f"block{block}_conv{j}", cin, filters, 3, rngs=rngs))
        cin = filters
    return out


class VGG16(Backbone):
    preprocess = "caffe"

    def __init__(self, input_size, *, rngs: nnx.Rngs):
        self.input_size = input_size
        blocks, cin = [], 3
        for b, (f, n) in enumerate(_BLOCKS, start=1):
            blocks.append(nnx.List(_convs(b, cin, f, n, rngs)))
            cin = f
        self.blocks = nnx.List(blocks[:-1])
        self.block_last = Block(convs=blocks[-1])

    @staticmethod
    def _block(convs, x):
        for c in convs:
            x = jax.nn.relu(c(x))
        return max_pool(x, 2, 2)

    def trunk(self, x, train=False):
        for convs in self.blocks:
            x = self._block(convs, x)
        return x

    def last_block(self, x, train=False):
        return self._block(self.block_last.convs, x)


SPECS = (BackboneSpec("vgg16", VGG16, 224, pretrained=(keras_file(
    "vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "6d6bbae143d832006294945121d1f1fc"),)),)

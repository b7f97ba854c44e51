"""InceptionV3 (Szegedy et al. 2016), a port of keras.applications.InceptionV3 (include_top=False).

Read top to bottom like keras/src/applications/inception_v3.py. Every Keras `conv2d_bn` is a
`ConvBN` (keras_graph.py): Conv2D without bias, BatchNormalization with scale=False (no gamma),
ReLU. Keras names those layers automatically (`conv2d_N`, `batch_normalization_N`, N in creation
order, offset by any model built earlier in the session), so we name them as a fresh Keras
session would and match weights by Keras's layer order (`keras_order`, see keras_graph.py).

Depth-1 training unfreezes `block_last`, the mixed10 module.
"""

from __future__ import annotations

from flax import nnx

from stackcls.models.backbones.base import Backbone, BackboneSpec
from stackcls.models.backbones.download import keras_file
from stackcls.models.backbones.keras_graph import (ConvBN, KerasNames, Sym, concat, keras_order,
                                            max_pool, parallel_1x1)


class InceptionA(nnx.Module):
    """mixed0..mixed2: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, names, in_ch, pool_filters, *, rngs):
        self.branch1x1 = ConvBN(names, in_ch, 64, 1, rngs=rngs)
        self.branch5x5_1 = ConvBN(names, in_ch, 48, 1, rngs=rngs)
        self.branch5x5_2 = ConvBN(names, 48, 64, 5, rngs=rngs)
        self.branch3x3dbl_1 = ConvBN(names, in_ch, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = ConvBN(names, 64, 96, 3, rngs=rngs)
        self.branch3x3dbl_3 = ConvBN(names, 96, 96, 3, rngs=rngs)
        self.branch_pool = ConvBN(names, in_ch, pool_filters, 1, rngs=rngs)
        self.out_ch = 64 + 64 + 96 + pool_filters

    def __call__(self, x, train=False):
        b1, b5, b3, bp = parallel_1x1(x, [self.branch1x1, self.branch5x5_1, self.branch3x3dbl_1],
                                      self.branch_pool, train)
        b5 = self.branch5x5_2(b5, train)
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(b3, train), train)
        return concat([b1, b5, b3, bp])


class ReductionA(nnx.Module):
    """mixed3: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, names, in_ch, *, rngs):
        self.branch3x3 = ConvBN(names, in_ch, 384, 3, 2, "valid", rngs=rngs)
        self.branch3x3dbl_1 = ConvBN(names, in_ch, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = ConvBN(names, 64, 96, 3, rngs=rngs)
        self.branch3x3dbl_3 = ConvBN(names, 96, 96, 3, 2, "valid", rngs=rngs)
        self.out_ch = 384 + 96 + in_ch

    def __call__(self, x, train=False):
        b3 = self.branch3x3(x, train)
        bd = self.branch3x3dbl_1(x, train)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(bd, train), train)
        return concat([b3, bd, max_pool(x, 3, 2, "valid")])


class InceptionC(nnx.Module):
    """mixed4..mixed7: 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avgpool-1x1 (c7 inner filters)."""

    def __init__(self, names, in_ch, c7, *, rngs):
        self.branch1x1 = ConvBN(names, in_ch, 192, 1, rngs=rngs)
        self.branch7x7_1 = ConvBN(names, in_ch, c7, 1, rngs=rngs)
        self.branch7x7_2 = ConvBN(names, c7, c7, (1, 7), rngs=rngs)
        self.branch7x7_3 = ConvBN(names, c7, 192, (7, 1), rngs=rngs)
        self.branch7x7dbl_1 = ConvBN(names, in_ch, c7, 1, rngs=rngs)
        self.branch7x7dbl_2 = ConvBN(names, c7, c7, (7, 1), rngs=rngs)
        self.branch7x7dbl_3 = ConvBN(names, c7, c7, (1, 7), rngs=rngs)
        self.branch7x7dbl_4 = ConvBN(names, c7, c7, (7, 1), rngs=rngs)
        self.branch7x7dbl_5 = ConvBN(names, c7, 192, (1, 7), rngs=rngs)
        self.branch_pool = ConvBN(names, in_ch, 192, 1, rngs=rngs)
        self.out_ch = 4 * 192

    def __call__(self, x, train=False):
        b1, b7, bd, bp = parallel_1x1(x, [self.branch1x1, self.branch7x7_1, self.branch7x7dbl_1],
                                      self.branch_pool, train)
        b7 = self.branch7x7_3(self.branch7x7_2(b7, train), train)
        bd = self.branch7x7dbl_3(self.branch7x7dbl_2(bd, train), train)
        bd = self.branch7x7dbl_5(self.branch7x7dbl_4(bd, train), train)
        return concat([b1, b7, bd, bp])


class ReductionB(nnx.Module):
    """mixed8: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, names, in_ch, *, rngs):
        self.branch3x3_1 = ConvBN(names, in_ch, 192, 1, rngs=rngs)
        self.branch3x3_2 = ConvBN(names, 192, 320, 3, 2, "valid", rngs=rngs)
        self.branch7x7x3_1 = ConvBN(names, in_ch, 192, 1, rngs=rngs)
        self.branch7x7x3_2 = ConvBN(names, 192, 192, (1, 7), rngs=rngs)
        self.branch7x7x3_3 = ConvBN(names, 192, 192, (7, 1), rngs=rngs)
        self.branch7x7x3_4 = ConvBN(names, 192, 192, 3, 2, "valid", rngs=rngs)
        self.out_ch = 320 + 192 + in_ch

    def __call__(self, x, train=False):
        b3, b7 = parallel_1x1(x, [self.branch3x3_1, self.branch7x7x3_1], train=train)
        b3 = self.branch3x3_2(b3, train)
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(b7, train), train), train)
        return concat([b3, b7, max_pool(x, 3, 2, "valid")])


class InceptionE(nnx.Module):
    """mixed9, mixed10: 1x1 | 1x1-(1x3,3x1) | 1x1-3x3-(1x3,3x1) | avgpool-1x1."""

    def __init__(self, names, in_ch, *, rngs):
        self.branch1x1 = ConvBN(names, in_ch, 320, 1, rngs=rngs)
        self.branch3x3 = ConvBN(names, in_ch, 384, 1, rngs=rngs)
        self.branch3x3_1 = ConvBN(names, 384, 384, (1, 3), rngs=rngs)
        self.branch3x3_2 = ConvBN(names, 384, 384, (3, 1), rngs=rngs)
        self.branch3x3dbl = ConvBN(names, in_ch, 448, 1, rngs=rngs)
        self.branch3x3dbl_0 = ConvBN(names, 448, 384, 3, rngs=rngs)
        self.branch3x3dbl_1 = ConvBN(names, 384, 384, (1, 3), rngs=rngs)
        self.branch3x3dbl_2 = ConvBN(names, 384, 384, (3, 1), rngs=rngs)
        self.branch_pool = ConvBN(names, in_ch, 192, 1, rngs=rngs)
        self.out_ch = 320 + 768 + 768 + 192

    def __call__(self, x, train=False):
        b1, b3, bd, bp = parallel_1x1(x, [self.branch1x1, self.branch3x3, self.branch3x3dbl],
                                      self.branch_pool, train)
        b3 = concat([self.branch3x3_1(b3, train), self.branch3x3_2(b3, train)])  # mixed9_i
        bd = self.branch3x3dbl_0(bd, train)
        bd = concat([self.branch3x3dbl_1(bd, train), self.branch3x3dbl_2(bd, train)])
        return concat([b1, b3, bd, bp])


class InceptionV3(Backbone):
    preprocess = "tf"

    def __init__(self, input_size: int, *, rngs: nnx.Rngs):
        self.input_size = input_size
        names = KerasNames()
        self.stem = nnx.List([
            ConvBN(names, 3, 32, 3, 2, "valid", rngs=rngs),
            ConvBN(names, 32, 32, 3, padding="valid", rngs=rngs),
            ConvBN(names, 32, 64, 3, rngs=rngs),
            # max pool 3x3/2
            ConvBN(names, 64, 80, 1, padding="valid", rngs=rngs),
            ConvBN(names, 80, 192, 3, padding="valid", rngs=rngs),
            # max pool 3x3/2
        ])
        self.mixed0 = InceptionA(names, 192, 32, rngs=rngs)
        self.mixed1 = InceptionA(names, self.mixed0.out_ch, 64, rngs=rngs)
        self.mixed2 = InceptionA(names, self.mixed1.out_ch, 64, rngs=rngs)
        self.mixed3 = ReductionA(names, self.mixed2.out_ch, rngs=rngs)
        self.mixed4 = InceptionC(names, self.mixed3.out_ch, 128, rngs=rngs)
        self.mixed5 = InceptionC(names, 768, 160, rngs=rngs)
        self.mixed6 = InceptionC(names, 768, 160, rngs=rngs)
        self.mixed7 = InceptionC(names, 768, 192, rngs=rngs)
        self.mixed8 = ReductionB(names, 768, rngs=rngs)
        self.mixed9 = InceptionE(names, self.mixed8.out_ch, rngs=rngs)
        self.block_last = InceptionE(names, self.mixed9.out_ch, rngs=rngs)  # Keras "mixed10"

    def trunk(self, x, train=False):
        """Preprocessed images (N, H, W, 3) -> mixed9 output, the input of mixed10."""
        s = self.stem
        x = s[2](s[1](s[0](x, train), train), train)
        x = max_pool(x, 3, 2, "valid")
        x = s[4](s[3](x, train), train)
        x = max_pool(x, 3, 2, "valid")
        for block in (self.mixed0, self.mixed1, self.mixed2, self.mixed3, self.mixed4,
                      self.mixed5, self.mixed6, self.mixed7, self.mixed8, self.mixed9):
            x = block(x, train)
        return x

    def last_block(self, carry, train=False):
        return self.block_last(carry, train)

    def keras_order(self) -> list[str]:
        """Keras `model.layers` order, replayed on the graph of our forward pass."""
        return [layer.name for layer in keras_order(self(Sym()))]


SPECS = (BackboneSpec("inception_v3", InceptionV3, 299, min_size=75, pretrained=(keras_file(
    "inception_v3/inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "bcbd6486424b2319ff4ef7d526e38f63"),), doc="InceptionV3, features from mixed10 (2048)"),)

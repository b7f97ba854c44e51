"""InceptionResNetV2 (Szegedy et al. 2017), a port of keras.applications.InceptionResNetV2
(include_top=False).

Read top to bottom like keras/src/applications/inception_resnet_v2.py. Every Keras `conv2d_bn` is
a `ConvBN` (keras_graph.py): Conv2D without bias, BatchNormalization with scale=False (no gamma),
ReLU. Unnamed ones get Keras's automatic names as a fresh session would give them (`conv2d_N`,
`batch_normalization_N`); weights are matched by Keras's layer order (`keras_order`, see
keras_graph.py). Each residual block ends in a 1x1 Conv2D with bias and no BatchNorm
(`block35_1_conv`), added to the shortcut scaled by 0.17 / 0.1 / 0.2 (Keras's CustomScaleLayer).

Depth-1 training unfreezes `block_last`: block8_10 (the last residual block, no final ReLU) and
conv_7b.
"""

from __future__ import annotations

from flax import nnx

from stackcls.models.backbones import layers as L
from stackcls.models.backbones.base import Backbone, BackboneSpec, Block
from stackcls.models.backbones.download import keras_file
from stackcls.models.backbones.keras_graph import (ConvBN, KerasNames, Sym, apply, call, concat,
                                            keras_order, max_pool, parallel_1x1, relu)


def scale_add(x, up, scale):
    """Keras CustomScaleLayer([x, up]): x + up * scale."""
    return apply(lambda a, b: a + b * scale, x, up)


class Branch(nnx.Module):
    """A chain of ConvBN; specs are (filters, kernel[, strides, padding])."""

    def __init__(self, names, in_ch, specs, *, rngs):
        convs = []
        for spec in specs:
            convs.append(ConvBN(names, in_ch, *spec, rngs=rngs))
            in_ch = spec[0]
        self.convs = nnx.List(convs)
        self.out_ch = in_ch

    def __call__(self, x, train=False):
        return self.tail(self.convs[0](x, train), train)

    def tail(self, x, train=False):
        """All convs but the first (which parallel_1x1 may have run)."""
        for c in self.convs[1:]:
            x = c(x, train)
        return x


def run_branches(x, branches, pool_branch=None, train=False):
    """Branches on the same input whose first convs are 1x1: those run as one convolution
    (parallel_1x1; `pool_branch` is the avgpool-1x1 branch)."""
    heads = parallel_1x1(x, [b.convs[0] for b in branches], pool_branch, train)
    return [b.tail(h, train) for b, h in zip(branches, heads)] + heads[len(branches):]


class Mixed5b(nnx.Module):
    """Stem end: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1 -> 320 channels."""

    def __init__(self, names, in_ch, *, rngs):
        self.branch_0 = Branch(names, in_ch, [(96, 1)], rngs=rngs)
        self.branch_1 = Branch(names, in_ch, [(48, 1), (64, 5)], rngs=rngs)
        self.branch_2 = Branch(names, in_ch, [(64, 1), (96, 3), (96, 3)], rngs=rngs)
        self.branch_pool = Branch(names, in_ch, [(64, 1)], rngs=rngs)
        self.out_ch = 96 + 64 + 96 + 64

    def __call__(self, x, train=False):
        return concat(run_branches(x, [self.branch_0, self.branch_1, self.branch_2],
                                   self.branch_pool.convs[0], train))


class Reduction(nnx.Module):
    """mixed_6a / mixed_7a: conv branches ending in a 3x3/2 valid conv, plus a 3x3/2 max pool."""

    def __init__(self, names, in_ch, branches, *, rngs):
        self.branches = nnx.List([Branch(names, in_ch, b, rngs=rngs) for b in branches])
        self.out_ch = sum(b.out_ch for b in self.branches) + in_ch
        self.lead_1x1 = all(b[0][1] == 1 for b in branches)  # mixed_7a, not mixed_6a

    def __call__(self, x, train=False):
        if self.lead_1x1:
            outs = run_branches(x, list(self.branches), train=train)
        else:
            outs = [b(x, train) for b in self.branches]
        return concat(outs + [max_pool(x, 3, 2, "valid")])


_BRANCHES = {
    "block35": [[(32, 1)], [(32, 1), (32, 3)], [(32, 1), (48, 3), (64, 3)]],
    "block17": [[(192, 1)], [(128, 1), (160, (1, 7)), (192, (7, 1))]],
    "block8": [[(192, 1)], [(192, 1), (224, (1, 3)), (256, (3, 1))]],
}


class InceptionResNetBlock(nnx.Module):
    """Keras `inception_resnet_block`: branches -> concat -> 1x1 conv (bias, no BN) ->
    x + scale * up -> ReLU (none for block8_10)."""

    def __init__(self, names, in_ch, block_type, block_idx, scale, activation=True, *, rngs):
        self.name = f"{block_type}_{block_idx}"
        self.branches = nnx.List([Branch(names, in_ch, b, rngs=rngs)
                                  for b in _BRANCHES[block_type]])
        mixed = sum(b.out_ch for b in self.branches)
        self.conv = L.Conv2D(f"{self.name}_conv", mixed, in_ch, 1, use_bias=True, rngs=rngs)
        self.scale = scale
        self.activation = activation

    def __call__(self, x, train=False):
        mixed = concat(run_branches(x, list(self.branches), train=train))
        x = scale_add(x, call(self.conv, mixed), self.scale)
        return relu(x) if self.activation else x


class InceptionResNetV2(Backbone):
    preprocess = "tf"

    def __init__(self, input_size: int, *, rngs: nnx.Rngs):
        self.input_size = input_size
        names = KerasNames()
        self.stem = Branch(names, 3, [(32, 3, 2, "valid"), (32, 3, 1, "valid"), (64, 3)],
                           rngs=rngs)
        # max pool 3x3/2
        self.stem2 = Branch(names, 64, [(80, 1, 1, "valid"), (192, 3, 1, "valid")], rngs=rngs)
        # max pool 3x3/2
        self.mixed_5b = Mixed5b(names, 192, rngs=rngs)
        c = self.mixed_5b.out_ch  # 320
        self.block35 = nnx.List([InceptionResNetBlock(names, c, "block35", i, 0.17, rngs=rngs)
                                 for i in range(1, 11)])
        self.mixed_6a = Reduction(names, c, [[(384, 3, 2, "valid")],
                                             [(256, 1), (256, 3), (384, 3, 2, "valid")]],
                                  rngs=rngs)
        c = self.mixed_6a.out_ch  # 1088
        self.block17 = nnx.List([InceptionResNetBlock(names, c, "block17", i, 0.1, rngs=rngs)
                                 for i in range(1, 21)])
        self.mixed_7a = Reduction(names, c, [[(256, 1), (384, 3, 2, "valid")],
                                             [(256, 1), (288, 3, 2, "valid")],
                                             [(256, 1), (288, 3), (320, 3, 2, "valid")]],
                                  rngs=rngs)
        c = self.mixed_7a.out_ch  # 2080
        self.block8 = nnx.List([InceptionResNetBlock(names, c, "block8", i, 0.2, rngs=rngs)
                                for i in range(1, 10)])
        self.block_last = Block(
            block8_10=InceptionResNetBlock(names, c, "block8", 10, 1.0, activation=False,
                                           rngs=rngs),
            conv_7b=ConvBN(names, c, 1536, 1, name="conv_7b", rngs=rngs))

    def trunk(self, x, train=False):
        """Preprocessed images (N, H, W, 3) -> block8_9 output, the input of block8_10."""
        x = max_pool(self.stem(x, train), 3, 2, "valid")
        x = max_pool(self.stem2(x, train), 3, 2, "valid")
        x = self.mixed_5b(x, train)
        for b in self.block35:
            x = b(x, train)
        x = self.mixed_6a(x, train)
        for b in self.block17:
            x = b(x, train)
        x = self.mixed_7a(x, train)
        for b in self.block8:
            x = b(x, train)
        return x

    def last_block(self, carry, train=False):
        x = self.block_last.block8_10(carry, train)
        return self.block_last.conv_7b(x, train)

    def keras_order(self) -> list[str]:
        """Keras `model.layers` order, replayed on the graph of our forward pass."""
        return [layer.name for layer in keras_order(self(Sym()))]


SPECS = (BackboneSpec("inception_resnet_v2", InceptionResNetV2, 299, min_size=75, pretrained=(
    keras_file("inception_resnet_v2/inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
               "d19885ff4a710c122648d3b5c3b684e4"),),
    doc="InceptionResNetV2, features from conv_7b (1536)"),)

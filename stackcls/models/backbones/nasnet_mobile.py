"""NASNet-A Mobile (Zoph et al. 2018), a port of keras.applications.NASNetMobile
(include_top=False).

Read top to bottom like keras/src/applications/nasnet.py: a stem conv, two stem reduction cells,
then 4 normal cells, a reduction cell, 4 normal cells, a reduction cell, 4 normal cells
(penultimate filters 1056, filters 44 -> 88 -> 176), final ReLU. Each cell takes the previous two
cell outputs (x, p); `_adjust_block` brings p to x's resolution (two shifted 1x1/2 paths) or to the
cell's width (1x1 projection). Stride-2 separable convs and the reduction cells' pools run on
explicitly zero-padded inputs (Keras `correct_pad` + "valid"); for the pools this differs from
"same" padding (zeros, not -inf / excluded cells), so we pad exactly as Keras does.

All Keras layers here are named; weights are still matched by Keras's layer order
(`keras_order`, see keras_graph.py), the order of the legacy HDF5 file.

Depth-1 training unfreezes `block_last`: the last normal cell (Keras names ending in `_12`,
including its `adjust_*_12` projection).
"""

from __future__ import annotations

from flax import nnx

from stackcls.models.backbones import layers as L
from stackcls.models.backbones.base import Backbone, BackboneSpec
from stackcls.models.backbones.download import keras_file
from stackcls.models.backbones.keras_graph import (Sym, add, apply, avg_pool, call, concat, keras_order,
                                            max_pool, relu, zero_pad)

PENULTIMATE_FILTERS = 1056
NUM_BLOCKS = 4
STEM_FILTERS = 32
MULTIPLIER = 2

_BN = dict(momentum=0.9997, epsilon=1e-3)


def crop_top_left(x):
    """Keras Cropping2D(((1, 0), (1, 0)))."""
    return apply(lambda y: y[:, 1:, 1:, :], x)


def pad_for_stride2(x, kernel):
    """Keras ZeroPadding2D(correct_pad(x, kernel)) before a stride-2 "valid" op."""
    return apply(lambda y: L.zero_pad(y, L.correct_pad(y, kernel)), x)


# ---- building blocks -------------------------------------------------------------------------------

def _bn(name, channels):
    return L.BatchNorm(name, channels, **_BN)


class SeparableConvBlock(nnx.Module):
    """Keras `_separable_conv_block`: 2 x [ReLU -> SeparableConv2D -> BN], the first strided."""

    def __init__(self, block_id, in_ch, filters, kernel, strides=1, *, rngs):
        self.kernel = kernel
        self.strides = strides
        pad = "valid" if strides == 2 else "same"
        self.sep1 = L.SeparableConv2D(f"separable_conv_1_{block_id}", in_ch, filters, kernel,
                                      strides, pad, use_bias=False, rngs=rngs)
        self.bn1 = _bn(f"separable_conv_1_bn_{block_id}", filters)
        self.sep2 = L.SeparableConv2D(f"separable_conv_2_{block_id}", filters, filters, kernel,
                                      1, "same", use_bias=False, rngs=rngs)
        self.bn2 = _bn(f"separable_conv_2_bn_{block_id}", filters)

    def __call__(self, x, train=False):
        x = relu(x)
        if self.strides == 2:
            x = pad_for_stride2(x, self.kernel)
        x = call(self.bn1, call(self.sep1, x), train=train)
        x = relu(x)
        return call(self.bn2, call(self.sep2, x), train=train)


class AdjustReduction(nnx.Module):
    """Keras `_adjust_block` when p has twice x's resolution: ReLU, then two 1x1/2 paths (the
    second shifted by one pixel), each a 1x1 conv to filters/2, concatenated, BN."""

    def __init__(self, block_id, in_ch, filters, *, rngs):
        self.conv_1 = L.Conv2D(f"adjust_conv_1_{block_id}", in_ch, filters // 2, 1,
                               use_bias=False, rngs=rngs)
        self.conv_2 = L.Conv2D(f"adjust_conv_2_{block_id}", in_ch, filters // 2, 1,
                               use_bias=False, rngs=rngs)
        self.bn = _bn(f"adjust_bn_{block_id}", filters // 2 * 2)

    def __call__(self, p, train=False):
        p = relu(p)
        p1 = call(self.conv_1, avg_pool(p, 1, 2, "valid"))
        p2 = crop_top_left(zero_pad(p, ((0, 1), (0, 1))))
        p2 = call(self.conv_2, avg_pool(p2, 1, 2, "valid"))
        return call(self.bn, concat([p1, p2]), train=train)


class AdjustProjection(nnx.Module):
    """Keras `_adjust_block` when p has x's resolution but not `filters` channels."""

    def __init__(self, block_id, in_ch, filters, *, rngs):
        self.conv = L.Conv2D(f"adjust_conv_projection_{block_id}", in_ch, filters, 1,
                             use_bias=False, rngs=rngs)
        self.bn = _bn(f"adjust_bn_{block_id}", filters)

    def __call__(self, p, train=False):
        return call(self.bn, call(self.conv, relu(p)), train=train)


def _adjust(block_id, x_shape, p_shape, filters, rngs):
    """Which `_adjust_block` Keras builds; shapes are (resolution level, channels)."""
    if p_shape is None:
        return None, x_shape
    if p_shape[0] != x_shape[0]:
        return AdjustReduction(block_id, p_shape[1], filters, rngs=rngs), (x_shape[0], filters)
    if p_shape[1] != filters:
        return AdjustProjection(block_id, p_shape[1], filters, rngs=rngs), (x_shape[0], filters)
    return None, p_shape


class NormalCell(nnx.Module):
    """Keras `_normal_a_cell` (Fig. 4 of the paper): (x, p) -> (6 * filters channels, x)."""

    def __init__(self, block_id, x_shape, p_shape, filters, *, rngs):
        self.adjust, p_shape = _adjust(block_id, x_shape, p_shape, filters, rngs)
        f, cp = filters, p_shape[1]
        self.conv_1 = L.Conv2D(f"normal_conv_1_{block_id}", x_shape[1], f, 1, use_bias=False,
                               rngs=rngs)
        self.bn_1 = _bn(f"normal_bn_1_{block_id}", f)
        self.left1 = SeparableConvBlock(f"normal_left1_{block_id}", f, f, 5, rngs=rngs)
        self.right1 = SeparableConvBlock(f"normal_right1_{block_id}", cp, f, 3, rngs=rngs)
        self.left2 = SeparableConvBlock(f"normal_left2_{block_id}", cp, f, 5, rngs=rngs)
        self.right2 = SeparableConvBlock(f"normal_right2_{block_id}", cp, f, 3, rngs=rngs)
        self.left5 = SeparableConvBlock(f"normal_left5_{block_id}", f, f, 3, rngs=rngs)
        self.out_shape = (x_shape[0], cp + 5 * f)

    def __call__(self, ip, p, train=False):
        if self.adjust is not None:
            p = self.adjust(p, train)
        elif p is None:
            p = ip
        h = call(self.bn_1, call(self.conv_1, relu(ip)), train=train)
        x1 = add([self.left1(h, train), self.right1(p, train)])
        x2 = add([self.left2(p, train), self.right2(p, train)])
        x3 = add([avg_pool(h, 3, 1, "same"), p])
        x4 = add([avg_pool(p, 3, 1, "same"), avg_pool(p, 3, 1, "same")])
        x5 = add([self.left5(h, train), h])
        return concat([p, x1, x2, x3, x4, x5]), ip


class ReductionCell(nnx.Module):
    """Keras `_reduction_a_cell`: (x, p) -> (4 * filters channels at half resolution, x)."""

    def __init__(self, block_id, x_shape, p_shape, filters, *, rngs):
        self.adjust, p_shape = _adjust(block_id, x_shape, p_shape, filters, rngs)
        f, cp = filters, p_shape[1]
        self.conv_1 = L.Conv2D(f"reduction_conv_1_{block_id}", x_shape[1], f, 1,
                               use_bias=False, rngs=rngs)
        self.bn_1 = _bn(f"reduction_bn_1_{block_id}", f)
        self.left1 = SeparableConvBlock(f"reduction_left1_{block_id}", f, f, 5, 2, rngs=rngs)
        self.right1 = SeparableConvBlock(f"reduction_right1_{block_id}", cp, f, 7, 2, rngs=rngs)
        self.right2 = SeparableConvBlock(f"reduction_right2_{block_id}", cp, f, 7, 2, rngs=rngs)
        self.right3 = SeparableConvBlock(f"reduction_right3_{block_id}", cp, f, 5, 2, rngs=rngs)
        self.left4 = SeparableConvBlock(f"reduction_left4_{block_id}", f, f, 3, rngs=rngs)
        self.out_shape = (x_shape[0] + 1, 4 * f)

    def __call__(self, ip, p, train=False):
        if self.adjust is not None:
            p = self.adjust(p, train)
        elif p is None:
            p = ip
        h = call(self.bn_1, call(self.conv_1, relu(ip)), train=train)
        h3 = pad_for_stride2(h, 3)  # reduction_pad_1
        x1 = add([self.left1(h, train), self.right1(p, train)])
        x2 = add([max_pool(h3, 3, 2, "valid"), self.right2(p, train)])
        x3 = add([avg_pool(h3, 3, 2, "valid"), self.right3(p, train)])
        x4 = add([x2, avg_pool(x1, 3, 1, "same")])
        x5 = add([self.left4(x1, train), max_pool(h3, 3, 2, "valid")])
        return concat([x2, x3, x4, x5]), ip


class NASNetMobile(Backbone):
    preprocess = "tf"

    def __init__(self, input_size: int, *, rngs: nnx.Rngs):
        self.input_size = input_size
        f = PENULTIMATE_FILTERS // 24  # 44
        m = MULTIPLIER
        self.stem_conv1 = L.Conv2D("stem_conv1", 3, STEM_FILTERS, 3, 2, "valid", use_bias=False,
                                   rngs=rngs)
        self.stem_bn1 = _bn("stem_bn1", STEM_FILTERS)
        # Cells in Keras order; shapes (resolution level, channels) decide the adjust blocks.
        plan = [("stem_1", ReductionCell, f // m**2), ("stem_2", ReductionCell, f // m)]
        plan += [(f"{i}", NormalCell, f) for i in range(NUM_BLOCKS)]
        plan += [(f"reduce_{NUM_BLOCKS}", ReductionCell, f * m)]
        plan += [(f"{NUM_BLOCKS + i + 1}", NormalCell, f * m) for i in range(NUM_BLOCKS)]
        plan += [(f"reduce_{2 * NUM_BLOCKS}", ReductionCell, f * m**2)]
        plan += [(f"{2 * NUM_BLOCKS + i + 1}", NormalCell, f * m**2) for i in range(NUM_BLOCKS)]
        x_shape, p_shape = (0, STEM_FILTERS), None
        cells = []
        for block_id, cls, filters in plan:
            cell = cls(block_id, x_shape, p_shape, filters, rngs=rngs)
            cells.append(cell)
            x_shape, p_shape = cell.out_shape, x_shape
        self.cells = nnx.List(cells[:-1])
        self.block_last = cells[-1]  # normal cell 12

    def trunk(self, x, train=False):
        """Preprocessed images (N, H, W, 3) -> (x, p), the two inputs of the last normal cell."""
        x = call(self.stem_bn1, call(self.stem_conv1, x), train=train)
        p = None
        for cell in self.cells:
            x, p = cell(x, p, train)
        return x, p

    def last_block(self, carry, train=False):
        x, p = carry
        x, _ = self.block_last(x, p, train)
        return relu(x)

    def keras_order(self) -> list[str]:
        """Keras `model.layers` order, replayed on the graph of our forward pass."""
        return [layer.name for layer in keras_order(self(Sym()))]


SPECS = (BackboneSpec("nasnet_mobile", NASNetMobile, 224, min_size=32, pretrained=(keras_file(
    "nasnet/NASNet-mobile-no-top.h5", "1ed92395b5b598bdda52abe5c0dbfd63",
    fname="nasnet_mobile_no_top.h5"),), doc="NASNet-A Mobile (4 @ 1056), features 1056"),)

"""MobileNet v1 (Howard et al. 2017), as keras.applications.MobileNet (include_top=False).

Last convolutional block (depth 1): conv_dw_13 / conv_pw_13 and their BatchNorms.
"""

from __future__ import annotations

from flax import nnx

from stackcls.models.backbones.base import Backbone, BackboneSpec, Block
from stackcls.models.backbones.download import keras_file
from stackcls.models.backbones.layers import BatchNorm, Conv2D, DepthwiseConv2D, relu6, zero_pad

# (pointwise filters before alpha, stride) of blocks 1..13
_BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1),
           (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1)]


class _DWBlock(nnx.Module):
    def __init__(self, i, cin, cout, stride, rngs):
        self.stride = stride
        self.dw = DepthwiseConv2D(f"conv_dw_{i}", cin, 3, stride,
                                  "same" if stride == 1 else "valid", use_bias=False, rngs=rngs)
        self.dw_bn = BatchNorm(f"conv_dw_{i}_bn", cin)
        self.pw = Conv2D(f"conv_pw_{i}", cin, cout, 1, use_bias=False, rngs=rngs)
        self.pw_bn = BatchNorm(f"conv_pw_{i}_bn", cout)

    def __call__(self, x, train=False):
        if self.stride != 1:
            x = zero_pad(x, ((0, 1), (0, 1)))  # Keras conv_pad_i
        x = relu6(self.dw_bn(self.dw(x), train))
        return relu6(self.pw_bn(self.pw(x), train))


class MobileNet(Backbone):
    preprocess = "tf"

    def __init__(self, input_size, alpha, *, rngs: nnx.Rngs):
        self.input_size = input_size
        self.alpha = alpha
        c = int(32 * alpha)
        self.conv1 = Conv2D("conv1", 3, c, 3, 2, use_bias=False, rngs=rngs)
        self.conv1_bn = BatchNorm("conv1_bn", c)
        blocks = []
        for i, (f, s) in enumerate(_BLOCKS, start=1):
            cout = int(f * alpha)
            blocks.append(_DWBlock(i, c, cout, s, rngs))
            c = cout
        self.blocks = nnx.List(blocks[:-1])
        self.block_last = Block(block=blocks[-1])

    def trunk(self, x, train=False):
        x = relu6(self.conv1_bn(self.conv1(x), train))
        for b in self.blocks:
            x = b(x, train)
        return x

    def last_block(self, x, train=False):
        return self.block_last.block(x, train)

    def pyramid(self, x, train=False):
        """Feature maps at strides 2, 4, 8, 16, 32 (the encoder of method=anatomy's decoder):
        each the last output before the resolution halves, and the last block's output."""
        x = relu6(self.conv1_bn(self.conv1(x), train))
        taps = []
        for b in self.blocks:
            if b.stride == 2:
                taps.append(x)
            x = b(x, train)
        return taps + [self.last_block(x, train)]


# Keras trained 4 widths x 4 input sizes; keras.applications picks the file by alpha and rows.
_ALPHA_TAGS = {0.25: "2_5", 0.5: "5_0", 0.75: "7_5", 1.0: "1_0"}
_ROWS = (128, 160, 192, 224)
# Keras publishes no hash for these files. The alpha 0.25 / 224 one we checked ourselves (sha256)
# and ship inside the package (stackcls/models/backbones/imagenet/, with its provenance and licence);
# the other 15 are unpinned (`verified` False: checked to be Keras HDF5 files, warned about once).
_PACKAGED = (0.25, 224)
_SHA256 = {_PACKAGED: "dbdb03ee2a22fd895301636cd328b234bb3a9952358f436d82f46b81e0d5b0bf"}

PRETRAINED = tuple(
    keras_file(f"mobilenet/mobilenet_{tag}_{rows}_tf_no_top.h5", _SHA256.get((alpha, rows)),
               alpha=alpha, rows=rows, packaged=(alpha, rows) == _PACKAGED)
    for alpha, tag in _ALPHA_TAGS.items() for rows in _ROWS)

SPECS = (BackboneSpec("mobilenet", MobileNet, 224, pretrained=PRETRAINED,
                      options={"alpha": 0.25}, doc="MobileNet v1, alpha 0.25 by default"),)

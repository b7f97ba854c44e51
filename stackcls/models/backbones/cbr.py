"""CBR baselines (Raghu et al. 2019, "Transfusion"), as in the study authors' Keras code.

Blocks of Conv2D (valid padding) - BatchNorm - ReLU - 2x2 max-pool; trained from scratch (no
ImageNet weights). The last block (depth 1 / block_last) is the last conv-BN-ReLU-pool block.

    cbr_large_t  7x7, 32-64-128-256-512
    cbr_large_w  7x7, 64-128-256-512
    cbr_small    7x7, 32-64-128-256
    cbr_tiny     5x5, 64-128-256-512

Preprocessing: "tf" (scale 0..255 to [-1, 1]): the networks learn from scratch, so only a
well-scaled, zero-centred input matters; the BatchNorm after the first conv removes the rest.
Layers use Keras defaults (glorot-uniform kernels, zero biases, BN momentum 0.99, eps 1e-3), so a
run matches what the authors' Keras models started from. At 224 input the spatial size after the
last block is 1 (large_t), 8 (large_w, small) or 10 (tiny).
"""

from __future__ import annotations

import jax
from flax import nnx

from stackcls.models.backbones.base import Backbone, BackboneSpec, Block
from stackcls.models.backbones.layers import BatchNorm, Conv2D, max_pool

CONFIGS = {
    "cbr_large_t": (7, (32, 64, 128, 256, 512)),
    "cbr_large_w": (7, (64, 128, 256, 512)),
    "cbr_small": (7, (32, 64, 128, 256)),
    "cbr_tiny": (5, (64, 128, 256, 512)),
}


class _CBRBlock(nnx.Module):
    def __init__(self, i, cin, cout, kernel, rngs):
        self.conv = Conv2D(f"block{i}_conv", cin, cout, kernel, padding="valid", rngs=rngs)
        self.bn = BatchNorm(f"block{i}_bn", cout)

    def __call__(self, x, train=False):
        return max_pool(jax.nn.relu(self.bn(self.conv(x), train)), 2, 2)


class CBR(Backbone):
    preprocess = "tf"

    def __init__(self, input_size, kernel, filters, *, rngs: nnx.Rngs):
        self.input_size = input_size
        blocks, cin = [], 3
        for i, f in enumerate(filters, start=1):
            blocks.append(_CBRBlock(i, cin, f, kernel, rngs))
            cin = f
        self.blocks = nnx.List(blocks[:-1])
        self.block_last = Block(block=blocks[-1])

    def trunk(self, x, train=False):
        for b in self.blocks:
            x = b(x, train)
        return x

    def last_block(self, x, train=False):
        return self.block_last.block(x, train)


def min_input_size(kernel, n_blocks):
    """Smallest input whose last block still has a 1x1 output."""
    s = 1
    for _ in range(n_blocks):
        s = 2 * s + kernel - 1
    return s


SPECS = tuple(
    BackboneSpec(name, CBR, 224, min_size=min_input_size(k, len(f)),
                 config={"kernel": k, "filters": f},
                 doc=f"CBR {k}x{k}, filters {'-'.join(map(str, f))}, from scratch")
    for name, (k, f) in CONFIGS.items())

"""Keras `model.layers` order for ports whose Keras layers are auto-named.

Legacy Keras weight files of InceptionV3 / InceptionResNetV2 name many layers `conv2d_N`, where N
depends on how many layers the saving session had built, so weights can only be matched by position
(as Keras itself does): the i-th weight-bearing layer of the file is the i-th of `model.layers`.
Keras orders a functional model's layers by their longest distance to the output (farthest first),
ties broken by the order a depth-first walk from the output first meets them
(keras/src/ops/function.py, `map_graph` and `_build_map`). That order interleaves branches, so it
is not the order layers are created in.

A port writes its forward pass once; every Keras layer call in it goes through `apply`, which runs
the computation on arrays and records a graph node on `Sym` inputs. `keras_order(model(Sym()))`
then replays Keras's sorting on that graph.

Also here, shared by the ports written this way (InceptionV3, InceptionResNetV2, NASNetMobile):
the weightless Keras layers as graph nodes, Keras's automatic layer names, and the Inception
building blocks (Keras's `conv2d_bn` as `ConvBN`, `parallel_1x1`).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from stackcls.models.backbones import layers as L


class Sym:
    """Symbolic stand-in for a Keras tensor: the layer call that produced it and its inputs."""

    __slots__ = ("layer", "inputs")

    def __init__(self, layer=None, inputs=()):
        self.layer = layer
        self.inputs = tuple(inputs)


def apply(fn: Callable, *xs, layer=None):
    """One Keras layer call: `fn(*xs)` on arrays; on symbolic inputs, a graph node for `layer`
    (the weight-bearing KerasLayer, or None for activations, pooling, merges, padding)."""
    if any(isinstance(x, Sym) for x in xs):
        return Sym(layer, xs)
    return fn(*xs)


def call(layer, x, **kw):
    """`layer(x, **kw)` recorded as a node for `layer`."""
    return apply(lambda y: layer(y, **kw), x, layer=layer)


def keras_order(output: Sym) -> list:
    """Weight-bearing layers in the order Keras's Functional `model.layers` lists them."""
    # Depth-first walk from the output: pre-order index per node (Keras `operation_indices`),
    # post-order list (Keras `nodes_in_decreasing_depth`). Iterative: graphs are ~1000 deep.
    index: dict[int, int] = {}
    post: list[Sym] = []
    stack = [(output, iter(output.inputs))]
    index[id(output)] = 0
    while stack:
        node, it = stack[-1]
        child = next(it, None)
        if child is None:
            stack.pop()
            post.append(node)
        elif id(child) not in index:
            index[id(child)] = len(index)
            stack.append((child, iter(child.inputs)))
    # Longest distance to the output.
    depth: dict[int, int] = {}
    for node in reversed(post):
        d = depth.setdefault(id(node), 0)
        for parent in node.inputs:
            depth[id(parent)] = max(depth.get(id(parent), 0), d + 1)
    ordered = sorted(post, key=lambda n: (-depth[id(n)], index[id(n)]))
    return [n.layer for n in ordered if n.layer is not None]


# ---- Keras layers without weights (each one node of the Keras graph) -----------------------------

def relu(x):
    return apply(jax.nn.relu, x)


def add(xs):
    return apply(lambda *a: sum(a[1:], a[0]), *xs)


def concat(xs):
    return apply(lambda *a: jnp.concatenate(a, axis=-1), *xs)


def avg_pool(x, size, strides, padding):
    return apply(lambda y: L.avg_pool(y, size, strides, padding), x)


def max_pool(x, size, strides, padding):
    return apply(lambda y: L.max_pool(y, size, strides, padding), x)


def zero_pad(x, pad):
    return apply(lambda y: L.zero_pad(y, pad), x)


# ---- Inception building blocks ---------------------------------------------------------------------

class KerasNames:
    """Keras auto-names in creation order: conv2d, conv2d_1, ...; batch_normalization, ...
    (what a fresh Keras 3 session gives layers built without a name)."""

    def __init__(self):
        self._count = {}

    def __call__(self, base):
        n = self._count.get(base, 0)
        self._count[base] = n + 1
        return base if n == 0 else f"{base}_{n}"


class ConvBN(nnx.Module):
    """Keras `conv2d_bn`: Conv2D(use_bias=False) -> BatchNormalization(scale=False) -> ReLU.
    `name` None: Keras auto-names from `names`; else conv `name`, BN `name_bn`."""

    def __init__(self, names, in_ch, filters, kernel, strides=1, padding="same", name=None, *,
                 rngs):
        self.conv = L.Conv2D(name or names("conv2d"), in_ch, filters, kernel, strides, padding,
                             use_bias=False, rngs=rngs)
        self.bn = L.BatchNorm(f"{name}_bn" if name else names("batch_normalization"), filters,
                              scale=False)

    def __call__(self, x, train=False):
        x = call(self.conv, x)
        x = call(self.bn, x, train=train)
        return relu(x)


# True / False: always / never fuse parallel 1x1 convs; "auto": fuse where the activations
# outweigh the kernels (the kernels are concatenated on every call, a copy that costs more
# than it saves on small maps, e.g. mixed9/10 at 8x8 or tiny test inputs).
FUSE_1X1 = "auto"


def parallel_1x1(x, convbns, pool_branch=None, train=False):
    """[c(x) for c in convbns] (+ pool_branch(3x3 average pool of x)) for 1x1 stride-1 ConvBNs.

    Computed as ONE 1x1 convolution with the kernels concatenated: the same dot products, one
    pass over x and one larger matrix product instead of several small ones. The pool branch
    joins it because a 3x3 average pool and a 1x1 convolution are both linear and commute
    (BatchNorm comes after both), so only the branch's own channels are pooled.
    """
    n_out = sum(c.conv.kernel.shape[-1] for c in convbns) + (
        pool_branch.conv.kernel.shape[-1] if pool_branch else 0)
    fuse = FUSE_1X1 if FUSE_1X1 != "auto" else (
        not isinstance(x, Sym) and x.shape[0] * x.shape[1] * x.shape[2] >= 4 * n_out)
    if isinstance(x, Sym) or not fuse:
        out = [c(x, train) for c in convbns]
        return out + ([pool_branch(avg_pool(x, 3, 1, "same"), train)] if pool_branch else [])
    allc = list(convbns) + ([pool_branch] if pool_branch else [])
    kernels = [c.conv.kernel[...] for c in allc]
    assert all(k.shape[:2] == (1, 1) for k in kernels) and all(c.conv.strides == (1, 1) for c in allc)
    k = jnp.concatenate(kernels, axis=-1)[0, 0]
    y = jnp.dot(x.reshape(-1, x.shape[-1]), k).reshape(*x.shape[:-1], k.shape[-1])
    ys, start = [], 0
    for kk in kernels:
        ys.append(y[..., start:start + kk.shape[-1]])
        start += kk.shape[-1]
    if pool_branch:
        ys[-1] = L.avg_pool(ys[-1], 3, 1, "same")
    return [jax.nn.relu(c.bn(yi, train)) for c, yi in zip(allc, ys)]

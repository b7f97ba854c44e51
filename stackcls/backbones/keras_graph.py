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
"""

from __future__ import annotations

from typing import Callable


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

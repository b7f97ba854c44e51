"""Backbone registry: Flax NNX ports of the Keras Applications backbones, plus CBR baselines.

    from stackcls.models import backbones
    backbones.names()                                   # all registered names
    m = backbones.create("mobilenet", weights="imagenet")   # Keras ImageNet weights
    f = backbones.features(m, images)                   # (N, H, W, 3) RGB 0..255 -> (N, D)

`create(name, weights="imagenet" | None | path, input_size=None, **options)`: "imagenet" uses the
Keras weight file the port declares: shipped in the package (MobileNet alpha 0.25), else from
`~/.keras/models`, our cache or the Keras bucket (download.py); None initialises randomly; a path
loads that Keras file (legacy .h5, Keras 3 .h5 or .weights.h5). Options: `alpha` for mobilenet
(0.25) and mobilenet_v2 (0.35); `seed` for random init.

Each port declares its registry entries (`SPECS`) next to its code; the contract every port
follows is in base.py.
"""

from __future__ import annotations

import functools
import weakref
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from stackcls.models.backbones import (cbr, densenet121, download, inception_resnet_v2, inception_v3,
                                mobilenet, mobilenet_v2, nasnet_mobile, resnet50_v2, vgg16,
                                xception)
from stackcls.models.backbones.base import Backbone, BackboneSpec, Block
from stackcls.models.backbones.preprocessing import preprocess_input
from stackcls.models.backbones.weights import load_keras_weights
from stackcls.batching import map_chunks

__all__ = ["names", "spec", "create", "features", "available", "Backbone", "BackboneSpec",
           "Block", "preprocess_input"]

# The ports, in the order names() lists them (the study's order, then the CBR baselines).
_PORTS = (vgg16, mobilenet, mobilenet_v2, inception_v3, resnet50_v2, inception_resnet_v2,
          densenet121, nasnet_mobile, xception, cbr)


def _gather(ports) -> dict[str, BackboneSpec]:
    registry: dict[str, BackboneSpec] = {}
    for port in ports:
        for s in port.SPECS:
            if s.name in registry:
                raise RuntimeError(f"backbone {s.name!r} registered twice ({port.__name__})")
            registry[s.name] = s
    return registry


_REGISTRY = _gather(_PORTS)


def names() -> list[str]:
    return list(_REGISTRY)


def available() -> list[str]:
    """Names that can be built here: every registered port (all are importable)."""
    return names()


def spec(name: str) -> BackboneSpec:
    if name not in _REGISTRY:
        raise KeyError(f"unknown backbone {name!r}; known: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def create(name: str, weights: str | Path | None = "imagenet", input_size: int | None = None,
           *, seed: int = 0, **options) -> Backbone:
    """Build a backbone; see the module docstring."""
    s = spec(name)
    unknown = set(options) - set(s.options)
    if unknown:
        raise TypeError(f"{name} takes options {sorted(s.options)}, not {sorted(unknown)}")
    opts = {**s.options, **options}
    size = int(input_size or s.input_size)
    if size < s.min_size:
        raise ValueError(f"{name} needs input_size >= {s.min_size}, got {size}")
    model = s.build(size, nnx.Rngs(seed), **opts)
    model.freeze_order()
    if weights is None:
        return model
    if isinstance(weights, str) and weights == "imagenet":
        path = download.fetch(s.weight_file(size, **opts))
    else:
        path = Path(weights)
    return load_keras_weights(model, path)


@functools.lru_cache(maxsize=32)
def _features_fn(graphdef, treedef, dtype):
    def f(values, x):
        state = jax.tree.unflatten(treedef, values)
        if dtype is not None:
            state = jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating)
                                 else a, state)
        model = nnx.merge(graphdef, state)
        x = preprocess_input(x, model.preprocess)
        if dtype is not None:
            x = x.astype(dtype)
        y = model(x, train=False)
        return jnp.mean(y.astype(jnp.float32), axis=(1, 2))
    return jax.jit(f)


# model -> (graphdef, treedef, its Variable objects). nnx.split walks the module graph in Python
# (~10 ms for a MobileNet), several times the GPU run time of a batch: walk once per model, then
# read the current values of the same Variable objects on each call (in-place updates, e.g. by
# training or weight loading, are seen; replacing a submodule afterwards is not).
_SPLIT_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _split(model):
    hit = _SPLIT_CACHE.get(model)
    if hit is None:
        graphdef, state = nnx.split(model)
        variables = list(nnx.to_flat_state(state).leaves)
        treedef = jax.tree.structure(state)
        if treedef.num_leaves != len(variables):
            raise RuntimeError("unexpected nnx state layout")
        hit = _SPLIT_CACHE[model] = (graphdef, treedef, variables)
    return hit


def features(model: Backbone, images, *, batch_size: int | None = None, dtype=None) -> jax.Array:
    """Global-average-pooled features (N, D) in inference mode.

    images: float (N, H, W, 3), RGB, 0..255, H = W = model.input_size. The backbone's Keras
    preprocess_input is applied inside. batch_size: run in chunks of this size (the last one
    padded, so one compilation serves all). dtype: compute in e.g. jnp.bfloat16 (GPU).
    """
    images = jnp.asarray(images, jnp.float32)
    n = model.input_size
    if images.ndim != 4 or images.shape[1:] != (n, n, 3):
        raise ValueError(f"images must be (N, {n}, {n}, 3) for {type(model).__name__} "
                         f"(input_size {n}), got {images.shape}")
    graphdef, treedef, variables = _split(model)
    values = [v[...] for v in variables]
    fn = _features_fn(graphdef, treedef, None if dtype is None else jnp.dtype(dtype))
    # A batch that fits runs as one unpadded call (its own compiled shape, as before chunking).
    chunk = None if batch_size is None or images.shape[0] <= batch_size else batch_size
    return map_chunks(lambda x: fn(values, x), images, chunk)

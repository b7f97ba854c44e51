"""Backbone registry: Flax NNX ports of the Keras Applications backbones, plus CBR baselines.

    from stackcls import backbones
    backbones.names()                                   # all registered names
    m = backbones.create("mobilenet", weights="imagenet")   # Keras ImageNet weights
    f = backbones.features(m, images)                   # (N, H, W, 3) RGB 0..255 -> (N, D)

`create(name, weights="imagenet" | None | path, input_size=None, **options)`: "imagenet" uses the
Keras weight file from `~/.keras/models`, our cache or the Keras bucket (download.py); None
initialises randomly; a path loads that Keras file (legacy .h5, Keras 3 .h5 or .weights.h5).
Options: `alpha` for mobilenet (0.25) and mobilenet_v2 (0.35), `seed` for random init.

The contract every port follows is in base.py.
"""

from __future__ import annotations

import functools
import importlib
import weakref
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stackcls.backbones.base import Backbone, BackboneSpec, Block
from stackcls.backbones.preprocessing import preprocess_input

__all__ = ["names", "spec", "create", "features", "feature_dim", "available", "last_block_filter", "trainable_filter",
           "Backbone", "BackboneSpec", "Block", "preprocess_input"]

# name -> module under stackcls.backbones defining SPECS (imported on first use).
_MODULES = {
    "vgg16": "vgg16",
    "mobilenet": "mobilenet",
    "mobilenet_v2": "mobilenet_v2",
    "inception_v3": "inception_v3",
    "resnet50_v2": "resnet50_v2",
    "inception_resnet_v2": "inception_resnet_v2",
    "densenet121": "densenet121",
    "nasnet_mobile": "nasnet_mobile",
    "xception": "xception",
    "cbr_large_t": "cbr",
    "cbr_large_w": "cbr",
    "cbr_small": "cbr",
    "cbr_tiny": "cbr",
}

# Selects the variables of the last convolutional block (what depth-1 training unfreezes).
last_block_filter = nnx.PathContains("block_last")


def trainable_filter(depth: int | str):
    """Which backbone variables train: depth 0 none, depth 1 the last block's Params, "all"
    every Param (CBR models, trained from scratch)."""
    if depth == 0:
        return nnx.Nothing
    if depth == 1:
        return nnx.All(nnx.Param, last_block_filter)
    if depth == "all":
        return nnx.Param
    raise ValueError(f"depth must be 0, 1 or 'all', got {depth!r}")


def names() -> list[str]:
    return list(_MODULES)


def available() -> list[str]:
    """Names whose port is importable (all of names() once every port has landed)."""
    out = []
    for n in _MODULES:
        try:
            spec(n)
            out.append(n)
        except NotImplementedError:
            pass
    return out


def spec(name: str) -> BackboneSpec:
    if name not in _MODULES:
        raise KeyError(f"unknown backbone {name!r}; known: {', '.join(_MODULES)}")
    modname = f"stackcls.backbones.{_MODULES[name]}"
    try:
        mod = importlib.import_module(modname)
    except ModuleNotFoundError as e:
        if e.name == modname:
            raise NotImplementedError(f"backbone {name!r} is not ported yet ({modname})") from e
        raise
    specs = getattr(mod, "SPECS", {})
    if name not in specs:
        raise NotImplementedError(f"backbone {name!r} is not registered yet ({modname}.SPECS)")
    return specs[name]


def create(name: str, weights: str | Path | None = "imagenet", input_size: int | None = None,
           *, seed: int = 0, **options) -> Backbone:
    """Build a backbone; see the module docstring."""
    s = spec(name)
    unknown = set(options) - set(s.kwargs)
    if unknown:
        raise TypeError(f"{name} takes options {sorted(s.kwargs)}, not {sorted(unknown)}")
    opts = {**s.kwargs, **options}
    size = int(input_size or s.input_size)
    if size < s.min_size:
        raise ValueError(f"{name} needs input_size >= {s.min_size}, got {size}")
    model = s.build(input_size=size, rngs=nnx.Rngs(seed), **opts)
    model.freeze_order()
    if weights is None:
        return model
    from stackcls.backbones import download, weights as W
    if isinstance(weights, str) and weights == "imagenet":
        if not s.pretrained:
            raise ValueError(f"{name} has no ImageNet weights (trained from scratch); "
                             "use weights=None")
        path = download.fetch(download.weight_file(name, input_size=size, **opts))
    else:
        path = Path(weights)
    return W.load_keras_weights(model, path)


def feature_dim(model: Backbone) -> int:
    """D of features(): the channels of the last feature map (no computation)."""
    n = model.input_size
    out = jax.eval_shape(lambda x: model(x), jax.ShapeDtypeStruct((1, n, n, 3), jnp.float32))
    return int(out.shape[-1])


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
        variables = list(state.flat_state().leaves)
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
    if batch_size is None or images.shape[0] <= batch_size:
        return fn(values, images)
    outs = []
    for i in range(0, images.shape[0], batch_size):
        chunk = images[i:i + batch_size]
        k = chunk.shape[0]
        if k < batch_size:
            chunk = jnp.concatenate([chunk, jnp.zeros((batch_size - k, n, n, 3), chunk.dtype)])
        outs.append(fn(values, chunk)[:k])
    return jnp.concatenate(outs)

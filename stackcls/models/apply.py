"""A classifier over a whole dataset: frozen-backbone passes and batched outputs.

    extract(model, x, "features" | "carry", views=V)  the frozen backbone once over images: pooled
                                                      features or trunk outputs, optionally for V
                                                      randomly rotated views per image
    pooled_features(model, carries)                   trunk outputs -> pooled features
    predict_outputs(model, inputs, stage)             (logits, penultimate) of a stage's inputs

Every pass goes through `stackcls.batching.map_chunks` (fixed chunk shape, last chunk padded), so
each runs one compiled function per shape.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stackcls.batching import map_chunks
from stackcls.models.classifier import Classifier
from stackcls.preprocess.augment import random_rotation
from stackcls.progress import bar as tqdm


def extract(model: Classifier, x: np.ndarray, what: str, views: int = 0, seed: int = 0,
            max_degrees: float = 45.0, chunk: int = 32, desc: str = "extract"):
    """Run the frozen backbone once over `x` (N, H, W, 3) RGB 0..255.

    what: "features" (pooled last-block output, (N, D)) or "carry" (trunk output, a pytree).
    views: 0 = the images as they are; V > 0 = V randomly rotated views per image, stacked on
    axis 1 ((N, V, ...)); view v of image n uses a key derived from (seed, v, n // chunk).
    Returns device arrays.
    """
    graphdef, state = nnx.split(model)
    base = jax.random.PRNGKey(seed)

    @jax.jit
    def run(state, xb, key):
        m = nnx.merge(graphdef, state, copy=True)
        xb = xb.astype(jnp.float32)
        if views > 0:
            xb = random_rotation(key, xb, max_degrees)
        carry = m.trunk(xb)
        return m.pooled(carry) if what == "features" else carry

    outs = []
    with tqdm(total=len(x) * max(views, 1), desc=desc, unit="img", leave=False) as bar:
        for v in range(max(views, 1)):
            view_key = jax.random.fold_in(base, v)
            outs.append(map_chunks(lambda xb, i: run(state, xb, jax.random.fold_in(view_key, i)),
                                   x, chunk, with_index=True, bar=bar))
    if views == 0:
        return outs[0]
    return jax.tree.map(lambda *a: jnp.stack(a, axis=1), *outs)



def pooled_features(model: Classifier, carries, views: bool = False, chunk: int = 64):
    """Pooled last-block features from cached trunk outputs: (N, ...) -> (N, D), or with views
    (N, V, ...) -> (N, V, D). One trunk pass (`extract(..., "carry")`) then serves both depths."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, c):
        return nnx.merge(graphdef, state, copy=True).pooled(c)

    lead = jax.tree.leaves(carries)[0].shape[:2]
    flat = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), carries) if views else carries
    # unpadded last chunk: the recorded results (and so the selections made on them) were computed so
    out = map_chunks(lambda c: run(state, c), flat, chunk, pad=False)
    return out.reshape(lead + out.shape[1:]) if views else out



def predict_outputs(model: Classifier, x, stage: str = "image", chunk: int = 64):
    """Inference on inputs of a stage -> (logits (N, 3), penultimate (N, 256)) as numpy."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, xb):
        m = nnx.merge(graphdef, state, copy=True)
        pen = m.head.penultimate(m.stage_features(xb, stage))
        return m.head.logits(pen), pen

    logits, pen = map_chunks(lambda xb: run(state, xb), x, chunk)
    return np.array(logits), np.array(pen)

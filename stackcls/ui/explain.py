"""Explanations: Grad-CAM for every backbone, and t-SNE of penultimate features.

Grad-CAM (Selvaraju et al. 2017): the gradient of a class score (the logit, before softmax) with
respect to the last convolutional feature map A (the output of `backbone.last_block`), averaged
over space, weights the channels of A; the ReLU of the weighted sum, upsampled bilinearly to the
input size and scaled to [0, 1] per image, is the map. Computed in one jitted call per chunk.
`gradcam_cells` picks the slices a run shows: the most confident one of every (truth, prediction).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stackcls.batching import map_chunks
from stackcls.models.classifier import Classifier, gap


def gradcam(model: Classifier, x, classes=None, chunk: int = 16) -> np.ndarray:
    """Grad-CAM maps (N, H, W) in [0, 1] for model inputs x (N, H, W, 3) RGB 0..255.

    classes: (N,) class index per image (default: the predicted class).
    """
    x = np.asarray(x, np.float32)
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, xb, cls):
        m = nnx.merge(graphdef, state, copy=True)
        fmap = m.feature_map(xb)
        logits = m.head(gap(fmap))
        cls = jnp.where(cls < 0, jnp.argmax(logits, -1), cls)

        def score(a):  # samples are independent, so one summed score gives every image's gradient
            return jnp.take_along_axis(m.head(gap(a)), cls[:, None], 1).sum()

        g = jax.grad(score)(fmap)
        w = g.mean(axis=(1, 2), keepdims=True)
        cam = jax.nn.relu((w * fmap).sum(-1))
        cam = jax.image.resize(cam, (cam.shape[0], xb.shape[1], xb.shape[2]), "linear")
        mx = cam.max(axis=(1, 2), keepdims=True)
        return jnp.where(mx > 0, cam / jnp.where(mx > 0, mx, 1.0), 0.0)

    cls = np.full(len(x), -1, np.int32) if classes is None else np.asarray(classes, np.int32)
    if len(x) == 0:
        return np.zeros((0,) + x.shape[1:3], np.float32)
    return np.asarray(map_chunks(lambda b: run(state, *b), (x, cls), chunk))


def gradcam_cells(y, probs) -> dict[tuple[int, int], int]:
    """For every (true class, predicted class) that occurs, the slice predicted with the highest
    probability of that class: {(truth, prediction): index into y}."""
    probs = np.asarray(probs)
    pred = np.argmax(probs, 1)
    cells = {}
    for i in range(3):
        for j in range(3):
            idx = np.flatnonzero((y == i) & (pred == j))
            if len(idx):
                cells[(i, j)] = int(idx[np.argmax(probs[idx, j])])
    return cells


def tsne(features, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """2-D t-SNE embedding (N, 2) of features (N, D) (scikit-learn; perplexity capped for small N)."""
    # imported here: sklearn.manifold takes ~2 s to import (measured), and Grad-CAM users
    # (label_ui) import this module without needing it
    from sklearn.manifold import TSNE

    f = np.asarray(features, np.float64)
    n = len(f)
    if n < 3 or not np.isfinite(f).all() or f.std(axis=0).max() < 1e-9:
        # degenerate input (e.g. dead features of an untrained model): scikit-learn's PCA init
        # divides by zero there and Barnes-Hut can crash, so return a point cloud at the origin
        return np.zeros((n, 2))
    p = float(min(perplexity, max(1.0, (n - 1) / 3.0)))
    return TSNE(n_components=2, perplexity=p, random_state=seed, init="pca").fit_transform(f)

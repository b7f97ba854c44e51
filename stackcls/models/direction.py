"""Which end of a stack is the apex, decided from the images when the geometry cannot say.

DICOM with complete geometry orients itself (io/geometry.py). Many NIfTI files do not: their
affines are placeholders (io/nifti.py says why in `meta["orientation"]`). For those, two kinds of
evidence from the data are summed as log-odds that the given order runs apex -> base:

- the ordered decoding's score in each direction (predict.py): decisive when the stack shows
  out-of-range slices, since OBS may only sit at the base and OAP only at the apex;
- this module's direction model: decisive also when every slice is IN, because a slice's features
  still say how basal it looks (larger cavity, outflow tract, atria).

The direction model is linear in the first moment of the standardised slice features along the
stack:  m = mean_i c_i z_i,  c_i running from -1 (first slice) to +1 (last),  logit = w . m.
Reversing a stack negates m, so logit(reversed) = -logit(given) for every w: the model cannot
prefer either direction a priori, and training on each stack in both orders is a logistic
regression without intercept. A few hundred numbers, fitted in well under a second, saved as JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from stackcls.atomic import write_json

FILE = "direction.json"
C_GRID = (0.01, 0.1, 1.0, 10.0)   # inverse L2 strength, chosen by subject-level CV


def moment(features, mean, std, length=None):
    """First moment (D,) of standardised features (S, D) along the stack; works on numpy and jax.
    length: of a stack padded to S rows (traceable); the rows after it do not count."""
    xp = jnp if isinstance(features, jnp.ndarray) or length is not None else np
    S = features.shape[0]
    if length is None:
        c = xp.linspace(-1.0, 1.0, S) if S > 1 else xp.zeros(1)
        return (c[:, None] * (features - mean) / std).mean(0)
    i = jnp.arange(S, dtype=jnp.float32)
    n = jnp.asarray(length, jnp.float32)
    c = jnp.where(n > 1, -1.0 + 2.0 * i / jnp.maximum(n - 1.0, 1.0), 0.0)   # linspace(-1, 1, n)
    c = jnp.where(i < n, c, 0.0)
    return (c[:, None] * (features - mean) / std).sum(0) / n


class DirectionModel:
    """logit(features (S, D)) > 0: the given order runs apex -> base."""

    def __init__(self, mean, std, weights, info: dict | None = None):
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        self.weights = np.asarray(weights, np.float32)
        self.info = dict(info or {})

    def logit(self, features, length=None):
        """Log-odds that `features` (S, D) run apex -> base (the first `length` rows of a padded
        stack); traceable inside a jit."""
        return moment(features, self.mean, self.std, length) @ self.weights

    def save(self, folder) -> Path:
        path = Path(folder) / FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, dict(mean=self.mean, std=self.std, weights=self.weights, info=self.info))
        return path

    @classmethod
    def load(cls, folder) -> "DirectionModel":
        path = Path(folder) / FILE
        try:
            blob = json.loads(path.read_text())
            model = cls(blob["mean"], blob["std"], blob["weights"], blob.get("info"))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a readable direction model ({type(e).__name__}: {e})") from None
        if not (model.mean.shape == model.std.shape == model.weights.shape) or model.mean.ndim != 1:
            raise ValueError(f"{path}: mean, std and weights must be vectors of one length")
        return model


def fit_direction(features: Sequence[np.ndarray], subjects: Sequence[str], seed: int = 0) -> DirectionModel:
    """Fit on stacks ordered apex -> base (each is also used reversed). C is chosen by leave-
    subjects-out CV, so a subject's ED and ES stacks never sit on both sides of a split."""
    # scikit-learn costs 2-5 s to import here; only training needs it, not every load_model
    from sklearn.linear_model import LogisticRegression

    feats = [np.asarray(f, np.float32) for f in features]
    if len(feats) < 2:
        raise ValueError(f"fit_direction: need at least 2 stacks, got {len(feats)}")
    allf = np.concatenate(feats)
    mean, std = allf.mean(0), allf.std(0) + 1e-3
    m = np.stack([moment(f, mean, std) for f in feats])
    X = np.concatenate([m, -m])
    y = np.r_[np.ones(len(m)), np.zeros(len(m))]
    groups = np.r_[subjects, subjects]
    uniq = np.array(sorted(set(subjects)))
    np.random.default_rng(seed).shuffle(uniq)
    folds = [f for f in np.array_split(uniq, min(5, len(uniq))) if len(f)]
    cv_acc = {}
    for C in C_GRID:
        hits = 0
        for held in folds:
            va = np.isin(groups, held)
            if va.all():
                continue
            clf = LogisticRegression(C=C, fit_intercept=False, max_iter=2000).fit(X[~va], y[~va])
            hits += int((clf.predict(X[va]) == y[va]).sum())
        cv_acc[C] = hits / len(y)
    best = max(C_GRID, key=lambda C: (cv_acc[C], -C))       # ties: the stronger regularisation
    clf = LogisticRegression(C=best, fit_intercept=False, max_iter=2000).fit(X, y)
    info = dict(C=best, cv_accuracy={str(k): round(v, 4) for k, v in cv_acc.items()},
                n_stacks=len(feats), train_accuracy=float(clf.score(X, y)))
    return DirectionModel(mean, std, clf.coef_[0], info)

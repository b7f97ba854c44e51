"""Slice- and stack-level metrics of Ho & Kim 2021, plus two stack-level measures of the IN range.

Conventions (all functions):
- Classes are indices into `CLASSES = ("OAP", "IN", "OBS")`; y_true and y_pred are (N,) ints.
- probs (N, 3) are per-class scores (probabilities; AUCs only use their order).
- stack_index (N,) names the stack of each slice. Within a stack, slices are taken in the order
  they appear in the arrays, which must be apex -> base; pass `slice_index` (N,) to sort them
  explicitly instead. Stacks need not be contiguous in the arrays.

Written in numpy (no scikit-learn at run time); the tests compare every metric with scikit-learn
or hand-computed cases.
"""

from __future__ import annotations

import numpy as np

from stackcls.decode.ordered import in_range
from stackcls.stack import CLASSES

N_CLASSES = len(CLASSES)


def _labels(y, name: str) -> np.ndarray:
    a = np.asarray(y)
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of class indices, got shape {a.shape}")
    if a.size and (not np.issubdtype(a.dtype, np.integer) or a.min() < 0 or a.max() >= N_CLASSES):
        raise ValueError(f"{name}: class indices must be integers in 0..{N_CLASSES - 1} "
                         f"({', '.join(CLASSES)}); got values {np.unique(a)[:10].tolist()}")
    return a.astype(np.int64)


def _pair(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    t, p = _labels(y_true, "y_true"), _labels(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} items but y_pred has {p.size}")
    if t.size == 0:
        raise ValueError("metrics: no items to evaluate")
    return t, p


def _probs(probs, n: int) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if p.shape != (n, N_CLASSES):
        raise ValueError(f"probs: expected shape ({n}, {N_CLASSES}), got {p.shape}")
    if not np.isfinite(p).all():
        raise ValueError("probs contain NaN or infinite values")
    return p


def stack_groups(stack_index, slice_index=None) -> list[np.ndarray]:
    """Item indices of each stack, stacks in sorted order of their id; within a stack in array
    order (= `[np.flatnonzero(stack_index == s) for s in np.unique(stack_index)]`), or sorted by
    `slice_index` when given. No items, no groups."""
    s = np.asarray(stack_index)
    if s.ndim != 1:
        raise ValueError(f"stack_index: expected shape (N,), got {s.shape}")
    if s.size == 0:
        return []
    if slice_index is None:
        order = np.argsort(s, kind="stable")
    else:
        sl = np.asarray(slice_index)
        if sl.shape != s.shape:
            raise ValueError(f"slice_index shape {sl.shape} != stack_index shape {s.shape}")
        order = np.lexsort((sl, s))
    _, starts = np.unique(s[order], return_index=True)
    return np.split(order, starts[1:])


def _check_groups(groups, n: int) -> None:
    if sum(len(g) for g in groups) != n:
        raise ValueError(f"stack_index has {sum(len(g) for g in groups)} items, labels have {n}")


# ---------------------------------------------------------------- slice-level
def confusion_matrix(y_true, y_pred) -> np.ndarray:
    """(3, 3) int64 counts; rows = truth, columns = prediction, order OAP, IN, OBS."""
    t, p = _pair(y_true, y_pred)
    return np.bincount(t * N_CLASSES + p, minlength=N_CLASSES ** 2).reshape(N_CLASSES, N_CLASSES)


def f1_per_class(y_true, y_pred) -> np.ndarray:
    """One-vs-rest F1 of each class (3,), = sklearn f1_score(average=None, labels=[0, 1, 2]).
    A class absent from both truth and prediction scores 0.0 (sklearn's zero_division default)."""
    cm = confusion_matrix(y_true, y_pred)
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(axis=0) + cm.sum(axis=1)  # 2tp + fp + fn
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)


def accuracy(y_true, y_pred) -> float:
    t, p = _pair(y_true, y_pred)
    return float(np.mean(t == p))


def binary_auc(y, score) -> float | None:
    """ROC AUC of binary labels y (bool) against scores: the Mann-Whitney statistic with average
    ranks for ties (identical to sklearn's trapezoidal roc_auc_score). None when y has only one
    class (undefined)."""
    y = np.asarray(y, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(score, kind="mergesort")
    _, first, counts = np.unique(score[order], return_index=True, return_counts=True)
    ranks = np.empty(y.size)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)  # 1-based average ranks
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def auc_per_class(y_true, probs) -> list[float | None]:
    """One-vs-rest AUC of each class; None for a class absent from y_true (or the only class)."""
    t = _labels(y_true, "y_true")
    p = _probs(probs, t.size)
    return [binary_auc(t == c, p[:, c]) for c in range(N_CLASSES)]


def auc_weighted(y_true, probs) -> float | None:
    """The paper's "micro-averaged AUC": the support-weighted mean of the one-vs-rest AUCs
    (= sklearn roc_auc_score(multi_class="ovr", average="weighted")). Classes whose AUC is
    undefined (absent from y_true) carry zero weight anyway and are left out; None only when no
    class has a defined AUC (y_true holds a single class)."""
    t = _labels(y_true, "y_true")
    aucs = auc_per_class(t, probs)
    support = np.bincount(t, minlength=N_CLASSES)
    ok = [c for c in range(N_CLASSES) if aucs[c] is not None]
    if not ok:
        return None
    w = support[ok].astype(np.float64)
    return float(np.dot(w, [aucs[c] for c in ok]) / w.sum())


def auc_micro(y_true, probs) -> float:
    """Standard micro-averaged AUC: one ROC over all (item, class) pairs of the one-hot truth
    (= sklearn roc_auc_score(label_binarize(y, classes=[0, 1, 2]), probs, average="micro"))."""
    t = _labels(y_true, "y_true")
    if t.size == 0:
        raise ValueError("metrics: no items to evaluate")
    p = _probs(probs, t.size)
    onehot = np.eye(N_CLASSES, dtype=bool)[t]
    return binary_auc(onehot.ravel(), p.ravel())  # always defined: each row has 1 pos, 2 neg


# ---------------------------------------------------------------- stack-aware
def soft_accuracy(y_true, y_pred, stack_index, slice_index=None) -> float:
    """Fraction of slices whose prediction equals the true label of the slice itself or of the
    slice just apical or just basal of it in the same stack (the paper's soft accuracy)."""
    t, p = _pair(y_true, y_pred)
    groups = stack_groups(stack_index, slice_index)
    _check_groups(groups, t.size)
    hits = 0
    for g in groups:
        yt, yp = t[g], p[g]
        ok = yp == yt
        ok[1:] |= yp[1:] == yt[:-1]
        ok[:-1] |= yp[:-1] == yt[1:]
        hits += int(ok.sum())
    return hits / t.size


def boundaries(labels) -> tuple[int, int]:
    """The two IN boundaries of one stack, as gaps between slices (0..S): (a, b) with
    a = first IN index and b = last IN index + 1, so slices a..b-1 are IN. Non-contiguous IN
    uses the first and the last IN. Without any IN slice the range is empty and both boundaries
    sit at a = b = the number of OAP slices: the OAP/OBS transition for an ordered labelling, the
    basal end if every slice is OAP, the apical end if every slice is OBS."""
    lab = np.asarray(labels)
    r = in_range(lab)
    if r is None:
        a = int(np.sum(lab == CLASSES.index("OAP")))
        return a, a
    return r[0], r[1] + 1


def exact_range_rate(y_true, y_pred, stack_index, slice_index=None) -> float:
    """Fraction of stacks whose predicted IN range (first..last IN index) equals the true one. A
    stack with no predicted IN is right only if its truth has no IN either."""
    t, p = _pair(y_true, y_pred)
    groups = stack_groups(stack_index, slice_index)
    _check_groups(groups, t.size)
    return float(np.mean([in_range(t[g]) == in_range(p[g]) for g in groups]))


def boundary_mae(y_true, y_pred, stack_index, slice_index=None) -> float:
    """Mean absolute error, in slices, of the two IN boundaries (see `boundaries`), averaged over
    both boundaries of every stack."""
    t, p = _pair(y_true, y_pred)
    groups = stack_groups(stack_index, slice_index)
    _check_groups(groups, t.size)
    err = [np.abs(np.subtract(boundaries(t[g]), boundaries(p[g]))).mean() for g in groups]
    return float(np.mean(err))


# ---------------------------------------------------------------- all together
def evaluate(y_true, probs, stack_index, y_pred=None, slice_index=None) -> dict:
    """Every metric as the METRICS dict of results.json (plain Python numbers, JSON-ready):
    {"n_slices", "n_stacks", "f1": {"OAP", "IN", "OBS"}, "auc_weighted", "auc_micro", "accuracy",
    "soft_accuracy", "exact_range_rate", "boundary_mae", "confusion"}.

    y_pred defaults to argmax(probs); ordered decoders pass their own labelling (AUCs still use
    probs). auc_weighted is None only if y_true holds a single class.
    """
    t = _labels(y_true, "y_true")
    if t.size == 0:
        raise ValueError("metrics: no items to evaluate")
    p = _probs(probs, t.size)
    yp = np.argmax(p, axis=1) if y_pred is None else _labels(y_pred, "y_pred")
    groups = stack_groups(stack_index, slice_index)
    _check_groups(groups, t.size)
    f1 = f1_per_class(t, yp)
    return {
        "n_slices": int(t.size),
        "n_stacks": len(groups),
        "f1": {c: float(f1[i]) for i, c in enumerate(CLASSES)},
        "auc_weighted": auc_weighted(t, p),
        "auc_micro": auc_micro(t, p),
        "accuracy": accuracy(t, yp),
        "soft_accuracy": soft_accuracy(t, yp, stack_index, slice_index),
        "exact_range_rate": exact_range_rate(t, yp, stack_index, slice_index),
        "boundary_mae": boundary_mae(t, yp, stack_index, slice_index),
        "confusion": confusion_matrix(t, yp).tolist(),
    }

"""Which (learning rate, epoch count) a cross-validated sweep picks: the one rule shared by the
classifier (`sweep.run_setting`) and the stack head (`stackcls.train.stack_head.train_stack_model`);
and which mode a model predicts in by default (`default_mode`).

Its own module because both sides import it: the stack head's trainer sits below `checkpoint`
(which rebuilds stack heads), and the classifier's sweep above it (which resumes final models).
"""

from __future__ import annotations

import numpy as np

TIES = ("fewer_epochs", "lower_loss")


def select(score, loss, ties: str = "fewer_epochs") -> tuple[int, int]:
    """(learning-rate row, epoch count) with the best fold-mean validation score.

    score, loss: (L, E) means over the folds, per learning rate (row) and epoch; a higher score is
    better. The tie-breaks differ between the two trainers and are part of their results:
      "fewer_epochs" (classifier): scores equal when rounded to 9 decimals go to fewer epochs,
                     then to the lower loss, then to the first row;
      "lower_loss"   (stack head): scores within 1e-9 of the best go to the lower loss, then to
                     the first row, then to fewer epochs.
    """
    score, loss = np.asarray(score), np.asarray(loss)
    if score.ndim != 2 or score.shape != loss.shape or score.size == 0:
        raise ValueError(f"select: want score and loss of one shape (L, E), got {score.shape} and "
                         f"{loss.shape}")
    if ties == "fewer_epochs":
        _, e, _, row = min((-round(float(a), 9), e, float(loss[row, e]), row)
                           for row, curve in enumerate(score) for e, a in enumerate(curve))
    elif ties == "lower_loss":
        near_best = np.argwhere(score >= score.max() - 1e-9)       # row-major: first row first
        row, e = min(near_best, key=lambda c: loss[c[0], c[1]])
    else:
        raise ValueError(f"select: ties={ties!r}, want one of {TIES}")
    return int(row), int(e) + 1


def default_mode(stack_folds, ordered_folds) -> dict:
    """The mode a model predicts in unless told: the simpler slice_ordered, unless the stack head
    beats it by more than one standard error of the paired per-fold difference in exact IN
    range (a gain within the folds' noise is not worth a second network that can generalise
    worse: on unseen ACDC patients the shipped model's stack mode did 0.60 against 0.67).
    stack_folds, ordered_folds: the per-fold exact-range rates of the same patient folds."""
    a, b = np.asarray(stack_folds, np.float64), np.asarray(ordered_folds, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"default_mode: want two equal-length per-fold lists, got {a.shape} and {b.shape}")
    d = a - b
    se = float(np.std(d, ddof=1) / np.sqrt(len(d))) if len(d) >= 2 else float("inf")
    mode = "stack" if float(d.mean()) > se else "slice_ordered"
    return dict(mode=mode, rule="stack only if it beats slice_ordered by more than one standard "
                "error of the paired per-fold difference in exact IN range",
                mean_difference=round(float(d.mean()), 4), standard_error=round(se, 4), folds=len(d))

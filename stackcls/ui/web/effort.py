"""Review effort: how much of a cohort a person must check before 95 % of its IN ranges are right.

A person checks stacks one by one and fixes every wrong range, so a checked stack counts as right.
Checking in the model's order (least sure first, by `range_probability`) is worth something only if
it beats the trivial answer ("every slice IN") checked in random order, whose expected share is
(target - p0) / (1 - p0), p0 its share of right ranges: the expected accuracy after checking a
share f of the stacks at random is p0 + f (1 - p0), a straight line.
"""

from __future__ import annotations

import math

import numpy as np


def _model_share(range_probability, correct, target: float) -> float:
    p = np.asarray(range_probability, np.float64)
    ok = np.asarray(correct, bool)
    n = len(p)
    # stable sort: ties keep the cohort's order, so the number is reproducible
    order = np.argsort(p, kind="stable")
    wrong_left = int((~ok).sum())
    # after checking k stacks, the right ranges are n - (wrong ones not yet checked)
    need = math.ceil(target * n - 1e-9)
    for k in range(n + 1):
        if n - wrong_left >= need:
            return k / n
        if k < n and not ok[order[k]]:
            wrong_left -= 1
    return 1.0


def review_effort(range_probability, correct, trivial_correct, target: float = 0.95) -> dict:
    """Share of stacks to check until `target` of the ranges are right.

    range_probability: (N,) P(the returned range) per stack; correct: (N,) the model's range is
    exactly the labelled one; trivial_correct: (N,) "every slice IN" is exactly the labelled range.
    Returns {"n", "target", "model": share in least-sure-first order, "model_stacks": how many,
    "trivial": expected share for every-slice-IN in random order, "p_model", "p_trivial": shares
    right before any check}; None values for an empty cohort.
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target must be in (0, 1], got {target}")
    p = np.asarray(range_probability, np.float64).reshape(-1)
    ok = np.asarray(correct, bool).reshape(-1)
    triv = np.asarray(trivial_correct, bool).reshape(-1)
    if not len(p) == len(ok) == len(triv):
        raise ValueError(f"lengths differ: {len(p)} probabilities, {len(ok)} correct, "
                         f"{len(triv)} trivial_correct")
    n = len(p)
    if n == 0:
        return dict(n=0, target=target, model=None, model_stacks=None, trivial=None,
                    p_model=None, p_trivial=None)
    if not np.isfinite(p).all():
        raise ValueError("range_probability holds NaN or infinity")
    share = _model_share(p, ok, target)
    p0 = float(triv.mean())
    trivial = 0.0 if p0 >= target else (target - p0) / (1.0 - p0)
    return dict(n=n, target=target, model=share, model_stacks=round(share * n), trivial=trivial,
                p_model=float(ok.mean()), p_trivial=p0)

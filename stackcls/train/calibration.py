"""Calibrating the probability of the returned IN range, and measuring how well it is calibrated.

The range distribution (`stackcls.decode.boundaries`) treats the per-slice log-scores as independent
evidence; a trained head is over-confident (or under-) in ways that compound over 10-16 slices.
One temperature T per mode divides the log-scores before the distribution is formed: it changes
no decision (the mode of the distribution is the ordered decoder's answer for every T > 0) and
only rescales how sure the model says it is. T minimises the negative log-likelihood of the true
IN range on stacks the scoring model did not train on:

    stack          the stack head's out-of-fold log-scores on the training stacks: one head per
                   fold of the head's own CV (same folds, the selected learning rate and epoch
                   count, `oof_stack_tables`)
    slice_ordered  the classifier's out-of-fold probabilities (the CV models of the sweep); also
                   used for mode "slice"

Saved as `calibration.json` beside the stack head (`stack/`), loaded by `inference.load_model`.

Measures (`range_measures`): the expected calibration error of P(returned range) (10 equal-width
bins, |accuracy - mean confidence| weighted by the bin's share of stacks), its Brier score, and the
share of wrong stacks that sit among the 20 % least confident; `truncation_test` cuts test stacks
short of the heart and checks that `coverage` notices.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from stackcls.atomic import write_json
from stackcls.decode.boundaries import COVERAGE_THRESHOLD, distribution_batch, distributions
from stackcls.decode.ordered import bucket, in_range
from stackcls.preprocess.arrays import patient_folds
from stackcls.stack import CLASS_INDEX

FILE = "calibration.json"
T_BOUNDS = (0.05, 20.0)
BINS = 10
LEAST_CONFIDENT = 0.2
OAP, OBS = CLASS_INDEX["OAP"], CLASS_INDEX["OBS"]


def mode_key(mode: str) -> str:
    """The temperature a prediction mode uses: the stack head's, or the classifier's."""
    return "stack" if mode == "stack" else "slice_ordered"


@dataclasses.dataclass
class Calibration:
    """Temperatures per scoring model ("stack", "slice_ordered") and how they were fitted."""

    temperatures: dict
    info: dict = dataclasses.field(default_factory=dict)

    def temperature(self, mode: str) -> float:
        return float(self.temperatures.get(mode_key(mode), 1.0))

    def save(self, folder) -> Path:
        path = Path(folder) / FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, dict(temperatures=self.temperatures, info=self.info))
        return path

    @classmethod
    def load(cls, folder) -> "Calibration":
        path = Path(folder) / FILE
        try:
            blob = json.loads(path.read_text())
            temps = {str(k): float(v) for k, v in blob["temperatures"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}: not a readable calibration ({type(e).__name__}: {e})") from None
        bad = {k: v for k, v in temps.items() if not (math.isfinite(v) and v > 0)}
        if bad:
            raise ValueError(f"{path}: temperatures must be finite and > 0, got {bad}")
        return cls(temps, blob.get("info") or {})


# ------------------------------------------------------------------------------- fitting

def _padded(tables):
    lengths = np.array([len(t) for t in tables], np.int32)
    batch = np.zeros((len(tables), bucket(int(lengths.max())), 3), np.float32)
    for i, t in enumerate(tables):
        batch[i, :len(t)] = t
    return jnp.asarray(batch), jnp.asarray(lengths)


def true_range(labels) -> tuple[int, int] | None:
    """The IN range (first, last) of a stack's true labels (class indices), None without IN."""
    return in_range(np.asarray(labels))


def range_log_likelihood(tables, truths, temperature: float) -> np.ndarray:
    """log P(IN range = truth) per stack (N,) at a temperature; truth None = no IN slice."""
    batch, lengths = _padded(tables)
    lj = np.asarray(distribution_batch(batch, lengths, float(temperature))["log_joint"], np.float64)
    out = np.empty(len(tables))
    for i, r in enumerate(truths):
        if r is None:
            L = int(lengths[i])
            d = np.diagonal(lj[i])[:L + 1]
            out[i] = d.max() + np.log(np.exp(d - d.max()).sum())
        else:
            out[i] = lj[i, r[0], r[1] + 1]
    return out


def fit_temperature(tables, truths) -> tuple[float, dict]:
    """The T in T_BOUNDS minimising the mean negative log-likelihood of the true IN ranges
    (bounded 1-D search over log T), and a record of the fit."""
    from scipy.optimize import minimize_scalar

    if not tables:
        raise ValueError("fit_temperature: no stacks to fit on")
    nll = lambda log_t: -float(range_log_likelihood(tables, truths, math.exp(log_t)).mean())
    res = minimize_scalar(nll, bounds=tuple(math.log(b) for b in T_BOUNDS), method="bounded",
                          options=dict(xatol=1e-3))
    t = float(math.exp(res.x))
    return t, dict(stacks=len(tables), nll_before=round(nll(0.0), 5), nll_after=round(float(res.fun), 5),
                   temperature=round(t, 5))


TABLES_KEY = 3      # train_stack_model folds in 1 (its CV runs) and 2 (the final run)


def oof_stack_tables(features, labels, subjects, model, seed: int = 0) -> list[np.ndarray] | None:
    """The stack head's out-of-fold log-scores (S_i, 3) on its own training stacks: the folds of
    its CV (same split, same standardisation as `train_stack_model`) trained at the selected
    learning rate for the selected epoch count, all folds in one vmapped run (one compile). None
    when the head was trained without CV.

    The runs are fresh (keys of their own, `TABLES_KEY`), not the CV's: the selection took the
    best point of the CV's noisy curves over 2 learning rates x hundreds of epochs, so those same
    runs score the selected point optimistically. Measured on the version 3 default model's folds
    (benchmarks/stack_oof.py): the CV's own runs 0.644 exact, fresh heads 0.603 +- 0.012 (5 seeds)."""
    import jax
    from flax import nnx

    from stackcls.models.stack_head import (StackHead, StackHeadConfig, Stat, pad,
                                            reverse_within_length)
    from stackcls.train.sequences import sequence_trainer
    from stackcls.train.stack_head import class_weights

    info = model.info or {}
    cv, sel = info.get("cv"), info.get("selected")
    if not cv or not sel:
        return None
    p = StackHeadConfig.of(info["protocol"])
    feats = [np.asarray(f, np.float32) for f in features]
    labs = [np.asarray(y, np.int32) for y in labels]
    x, n = pad(feats)
    y, _ = pad(labs, fill=-1)
    allf = np.concatenate(feats)
    head = StackHead(x.shape[-1], int(p.hidden), float(p.dropout), bool(p.residual), rngs=nnx.Rngs(seed))
    head.mean[...] = jnp.asarray(allf.mean(0))
    head.std[...] = jnp.asarray(allf.std(0) + 1e-3)
    graphdef, params, stats = nnx.split(head, nnx.Param, Stat)
    k, lr, epochs = int(cv["folds"]), float(sel["learning_rate"]), int(sel["epochs"])
    folds = patient_folds(list(subjects), k=k, seed=seed)
    w_tr = np.zeros((k, len(feats)), np.float32)
    for f, (tr, va) in enumerate(folds):
        w_tr[f, tr] = 1
    keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), TABLES_KEY), k)
    train = sequence_trainer(graphdef, epochs, weight_decay=p.weight_decay,
                             feature_noise=p.feature_noise, reverse_prob=p.reverse_prob,
                             reverse=reverse_within_length)
    cw = class_weights(np.concatenate(labs), p.class_weight)
    fold_params, _ = train(params, stats, x, y, n, cw, jnp.asarray(w_tr), jnp.asarray(1 - w_tr),
                           jnp.full((k,), lr, jnp.float32), keys, jnp.full((k,), epochs, jnp.int32))
    lp = np.asarray(jax.vmap(lambda prm: jax.nn.log_softmax(
        nnx.merge(graphdef, prm, stats)(jnp.asarray(x), jnp.asarray(n)), -1))(fold_params))
    out: list = [None] * len(feats)
    for f, (_, va) in enumerate(folds):
        for i in va:
            out[i] = lp[f, i, :n[i]]
    return out


# ------------------------------------------------------------------------------- measuring

def range_outcomes(tables, truths, temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(P(returned range) (N,), returned range == truth (N,) bool), the returned range being the
    ordered decoder's (the mode of each distribution)."""
    p, ok = [], []
    for d, truth in zip(distributions(tables, temperature), truths):
        a, b = d.mode()
        rng = None if a == b else (a, b - 1)
        p.append(d.probability(rng))
        ok.append(rng == (None if truth is None else tuple(int(v) for v in truth)))
    return np.array(p), np.array(ok, bool)


def reliability(p, correct, bins: int = BINS) -> dict:
    """Per equal-width bin of confidence: mean confidence, accuracy and count (empty bins: NaN)."""
    p, c = np.asarray(p, float), np.asarray(correct, float)
    idx = np.minimum((p * bins).astype(int), bins - 1)
    n = np.bincount(idx, minlength=bins)
    conf = np.bincount(idx, p, minlength=bins) / np.maximum(n, 1)
    acc = np.bincount(idx, c, minlength=bins) / np.maximum(n, 1)
    return dict(confidence=np.where(n > 0, conf, np.nan), accuracy=np.where(n > 0, acc, np.nan),
                count=n)


def ece(p, correct, bins: int = BINS) -> float:
    r = reliability(p, correct, bins)
    n = r["count"]
    keep = n > 0
    return float(np.sum(n[keep] * np.abs(r["accuracy"][keep] - r["confidence"][keep])) / max(n.sum(), 1))


def brier(p, correct) -> float:
    return float(np.mean((np.asarray(p, float) - np.asarray(correct, float)) ** 2))


def least_confident_share(p, correct, frac: float = LEAST_CONFIDENT) -> float | None:
    """Share of the wrong stacks found among the `frac` least confident stacks (None: none wrong)."""
    p, wrong = np.asarray(p, float), ~np.asarray(correct, bool)
    if not wrong.any():
        return None
    k = max(1, int(round(frac * len(p))))
    low = np.argsort(p, kind="stable")[:k]
    return float(wrong[low].sum() / wrong.sum())


def range_measures(p, correct) -> dict:
    """The calibration numbers of one mode on one set of stacks (results.json). The ceiling is
    the best share any ranking could reach: the 20 % hold at most that many of the wrong stacks."""
    n_wrong = int(len(p) - np.sum(correct))
    k = max(1, int(round(LEAST_CONFIDENT * len(p))))
    return dict(stacks=int(len(p)), exact=float(np.mean(correct)) if len(p) else None,
                mean_probability=float(np.mean(p)) if len(p) else None,
                ece=ece(p, correct), brier=brier(p, correct),
                wrong_in_least_confident_20=least_confident_share(p, correct),
                wrong_in_least_confident_20_ceiling=min(1.0, k / n_wrong) if n_wrong else None)


def truncation_test(features, labels, score, temperature: float = 1.0,
                    threshold: float = COVERAGE_THRESHOLD, margin: int = 0) -> dict:
    """Coverage flags on stacks cut short of the heart and on untouched complete stacks.

    features, labels: per stack (S_i, D) and true classes (S_i,), apex first; score: list of
    features -> list of log-score tables (the scoring model run on the cut stacks, so a head that
    sees the whole stack sees it cut). A stack with OAP slices at the apex is cut just below its
    first IN slice (which shows a clear LV cavity, by the definition of IN), one with OBS slices at
    the base just above its last IN slice; `coverage` should flag that end. margin > 0 cuts that
    many IN slices more (the end slice then lies well inside the LV; stacks with fewer than
    margin + 2 IN slices are left out). Complete stacks (OAP first, OBS last) are scored as they
    are; neither end should be flagged."""
    cuts = dict(apex=[], base=[])
    complete = []
    for f, y in zip(features, labels):
        y = np.asarray(y)
        rng = true_range(y)
        if rng is None:
            continue
        long_enough = rng[1] - rng[0] + 1 >= margin + 2
        if y[0] == OAP and long_enough:
            cuts["apex"].append(f[rng[0] + margin:])
        if y[-1] == OBS and long_enough:
            cuts["base"].append(f[:rng[1] + 1 - margin])
        if y[0] == OAP and y[-1] == OBS:
            complete.append(f)
    out = {}
    for end, feats in cuts.items():
        covs = [d.coverage(threshold) for d in distributions(score(feats), temperature)] if feats else []
        out[f"cut_{end}"] = dict(stacks=len(feats), flagged=float(np.mean(
            [end in c["status"] for c in covs])) if covs else None)
    covs = [d.coverage(threshold) for d in distributions(score(complete), temperature)] if complete else []
    out["complete"] = dict(stacks=len(complete), flagged=float(np.mean(
        [c["status"] != "complete" for c in covs])) if covs else None)
    out.update(threshold=threshold, margin=margin)
    return out


def classifier_tables(features) -> list[np.ndarray]:
    """The classifier's log-scores of each stack: the last 3 columns of `slice_features` (they do
    not depend on the rest of the stack, so a cut stack keeps its rows)."""
    return [np.asarray(f, np.float32)[:, -3:] for f in features]


# ------------------------------------------------------------------------------- review effort

# Review effort: how much of a cohort a person must check before 95 % of its IN ranges are right.
# 
# A person checks stacks one by one and fixes every wrong range, so a checked stack counts as right.
# Checking in the model's order (least sure first, by `range_probability`) is worth something only if
# it beats the trivial answer ("every slice IN") checked in random order, whose expected share is
# (target - p0) / (1 - p0), p0 its share of right ranges: the expected accuracy after checking a
# share f of the stacks at random is p0 + f (1 - p0), a straight line.

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


__all__ = ["Calibration", "FILE", "fit_temperature", "oof_stack_tables", "range_outcomes",
           "range_measures", "reliability", "ece", "brier", "least_confident_share",
           "truncation_test", "classifier_tables", "true_range", "mode_key", "review_effort"]

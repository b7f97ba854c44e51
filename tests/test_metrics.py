"""Every metric against scikit-learn or a hand-computed case."""

import json

import numpy as np
import pytest
from sklearn import metrics as skm
from sklearn.preprocessing import label_binarize

from stackcls.study.metrics import (auc_micro, auc_per_class, auc_weighted, binary_auc, boundaries,
                              boundary_mae, confusion_matrix, evaluate, exact_range_rate,
                              f1_per_class, soft_accuracy, stack_groups)


def _random_case(seed, n=300, ties=False):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3)) + 1.5 * np.eye(3)[y]
    if ties:
        logits = np.round(logits, 0)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    stack = np.repeat(np.arange(n // 10), 10)
    return y, probs, stack


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True), (2, False)])
def test_slice_metrics_match_sklearn(seed, ties):
    y, probs, stack = _random_case(seed, ties=ties)
    pred = probs.argmax(1)
    np.testing.assert_array_equal(confusion_matrix(y, pred), skm.confusion_matrix(y, pred, labels=[0, 1, 2]))
    np.testing.assert_allclose(f1_per_class(y, pred), skm.f1_score(y, pred, average=None, labels=[0, 1, 2]))
    np.testing.assert_allclose(auc_weighted(y, probs),
                               skm.roc_auc_score(y, probs, multi_class="ovr", average="weighted"), rtol=1e-12)
    np.testing.assert_allclose(auc_micro(y, probs),
                               skm.roc_auc_score(label_binarize(y, classes=[0, 1, 2]), probs, average="micro"),
                               rtol=1e-12)
    for c, a in enumerate(auc_per_class(y, probs)):
        np.testing.assert_allclose(a, skm.roc_auc_score(y == c, probs[:, c]), rtol=1e-12)
    m = evaluate(y, probs, stack)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))


def test_binary_auc_hand_cases():
    assert binary_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert binary_auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)  # tie counts half
    assert binary_auc([1, 1, 0], [0.9, 0.8, 0.1]) == 1.0
    assert binary_auc([1, 1], [0.2, 0.3]) is None


def test_absent_class_is_excluded_not_nan():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 60)  # no OBS in the truth
    probs = rng.dirichlet(np.ones(3), 60)
    aucs = auc_per_class(y, probs)
    assert aucs[2] is None
    w = np.bincount(y, minlength=3)
    ref = (w[0] * skm.roc_auc_score(y == 0, probs[:, 0]) + w[1] * skm.roc_auc_score(y == 1, probs[:, 1])) / w.sum()
    assert auc_weighted(y, probs) == pytest.approx(ref, rel=1e-12)
    pred = np.where(probs[:, 2] > 0.9, 2, probs[:, :2].argmax(1))
    m = evaluate(y, probs, np.zeros(60, int), y_pred=pred)
    np.testing.assert_allclose([m["f1"][c] for c in ("OAP", "IN", "OBS")],
                               skm.f1_score(y, pred, average=None, labels=[0, 1, 2], zero_division=0))
    assert auc_weighted(np.ones(5, int), rng.dirichlet(np.ones(3), 5)) is None


def test_soft_accuracy_hand_case():
    # stack 0 truth OAP IN IN OBS; stack 1 truth OAP OAP IN
    y = np.array([0, 1, 1, 2, 0, 0, 1])
    p = np.array([1, 1, 2, 0, 0, 1, 0])
    st = np.array([0, 0, 0, 0, 1, 1, 1])
    # ok: 0 (OAP pred IN, neighbour IN), 1 exact, 2 (pred OBS, basal neighbour OBS), 3 no,
    #     4 exact, 5 (pred IN, basal neighbour IN), 6 (pred OAP, apical neighbour OAP)
    assert soft_accuracy(y, p, st) == pytest.approx(6 / 7)
    # a neighbour in a different stack does not count: slice 3 (OBS truth) would match slice 4's OAP
    assert soft_accuracy(y, p, st) < soft_accuracy(y, p, np.zeros(7, int))
    # slice_index reorders: reversing stack 0 via slice_index gives the same answer as reversing the arrays
    rev = np.r_[3, 2, 1, 0, 4, 5, 6]
    sl = np.r_[3, 2, 1, 0, 0, 1, 2]
    assert soft_accuracy(y[rev], p[rev], st, slice_index=sl) == pytest.approx(6 / 7)


def test_boundaries_and_range_metrics_hand_cases():
    assert boundaries([0, 1, 1, 2]) == (1, 3)
    assert boundaries([0, 1, 0, 1, 2]) == (1, 4)  # non-contiguous: first and last IN
    assert boundaries([0, 0, 2, 2]) == (2, 2)  # no IN: empty range at the OAP/OBS transition
    assert boundaries([0, 0, 0]) == (3, 3) and boundaries([2, 2]) == (0, 0)  # stack ends
    y = np.array([0, 1, 1, 2, 2,   0, 1, 1, 1,   0, 0, 2])
    p = np.array([0, 1, 1, 2, 2,   1, 1, 1, 2,   0, 0, 2])
    st = np.repeat([7, 3, 5], [5, 4, 3])
    # stack 7 exact; stack 3: truth (1,3) pred (0,2) -> wrong, |1-0|+|4-3| = 2 -> 1.0;
    # stack 5 no IN in either -> right, boundaries (2,2) vs (2,2)
    assert exact_range_rate(y, p, st) == pytest.approx(2 / 3)
    assert boundary_mae(y, p, st) == pytest.approx((0 + 1.0 + 0) / 3)
    p2 = p.copy()
    p2[9:] = [2, 2, 2]  # still no IN, but the transition moved to the apex: boundary error 2
    assert exact_range_rate(y, p2, st) == pytest.approx(2 / 3)
    assert boundary_mae(y, p2, st) == pytest.approx((0 + 1.0 + 2.0) / 3)
    p3 = p.copy()
    p3[:5] = [0, 0, 0, 2, 2]  # no predicted IN where the truth has some: wrong
    assert exact_range_rate(y, p3, st) == pytest.approx(1 / 3)
    # boundaries of a predicted-empty range sit at the transition: truth (1,3) vs pred (3,3)
    assert boundary_mae(y, p3, st) == pytest.approx((1.0 + 1.0 + 0) / 3)


def test_evaluate_schema_and_json():
    y, probs, stack = _random_case(3, n=120)
    m = evaluate(y, probs, stack)
    assert list(m) == ["n_slices", "n_stacks", "f1", "auc_weighted", "auc_micro", "accuracy",
                       "soft_accuracy", "exact_range_rate", "boundary_mae", "confusion"]
    assert m["n_slices"] == 120 and m["n_stacks"] == 12 and list(m["f1"]) == ["OAP", "IN", "OBS"]
    assert type(m["n_slices"]) is int and all(type(v) is float for v in m["f1"].values())
    for k in ("auc_weighted", "auc_micro", "accuracy", "soft_accuracy", "exact_range_rate", "boundary_mae"):
        assert type(m[k]) is float and np.isfinite(m[k]), k
    assert all(type(v) is int for row in m["confusion"] for v in row)
    assert sum(map(sum, m["confusion"])) == 120
    assert m["soft_accuracy"] >= m["accuracy"]
    json.loads(json.dumps(m, allow_nan=False))
    # a perfect labelling
    perfect = evaluate(y, np.eye(3)[y], stack)
    assert perfect["accuracy"] == 1.0 and perfect["exact_range_rate"] == 1.0 and perfect["boundary_mae"] == 0.0
    assert perfect["auc_weighted"] == 1.0 and perfect["auc_micro"] == 1.0
    # y_pred overrides argmax for label metrics but AUC still uses probs
    m2 = evaluate(y, probs, stack, y_pred=y)
    assert m2["accuracy"] == 1.0 and m2["auc_weighted"] == m["auc_weighted"]


def test_bad_inputs():
    with pytest.raises(ValueError, match="class indices"):
        evaluate(np.array([0, 3]), np.full((2, 3), 1 / 3), np.zeros(2, int))
    with pytest.raises(ValueError, match="probs"):
        evaluate(np.array([0, 1]), np.full((2, 2), 0.5), np.zeros(2, int))
    with pytest.raises(ValueError, match="NaN"):
        evaluate(np.array([0, 1]), np.array([[np.nan, 0, 1], [0, 1, 0]]), np.zeros(2, int))
    with pytest.raises(ValueError, match="stack_index"):
        evaluate(np.array([0, 1]), np.full((2, 3), 1 / 3), np.zeros(3, int))
    with pytest.raises(ValueError, match="no items"):
        evaluate(np.array([], int), np.zeros((0, 3)), np.array([], int))


def test_stack_groups():
    rng = np.random.default_rng(3)
    stack = rng.permutation(np.repeat([7, 2, 5, 11], [3, 5, 1, 4]))     # ids neither sorted nor contiguous
    groups = stack_groups(stack)
    ref = [np.flatnonzero(stack == s) for s in np.unique(stack)]        # the evaluation's grouping
    assert len(groups) == len(ref)
    for g, r in zip(groups, ref):
        np.testing.assert_array_equal(g, r)
    sl = rng.permutation(len(stack))                                    # explicit apex -> base order
    for g in stack_groups(stack, sl):
        assert len(set(stack[g])) == 1 and np.all(np.diff(sl[g]) > 0)
    assert stack_groups(np.array([], int)) == []
    with pytest.raises(ValueError, match="slice_index shape"):
        stack_groups(stack, sl[:-1])

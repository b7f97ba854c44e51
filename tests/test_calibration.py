"""Temperature fitting, calibration measures and the truncation test, against references."""

import json

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss

from stackcls.boundaries import brute_force_ranges, distribution
from stackcls.calibration import (Calibration, brier, classifier_tables, ece, fit_temperature,
                                  least_confident_share, oof_stack_tables, range_measures,
                                  range_outcomes, reliability, truncation_test)
from stackcls.decode import ordered_decode


def test_ece_and_brier_against_sklearn():
    rng = np.random.default_rng(0)
    p = rng.random(500)
    correct = rng.random(500) < p ** 1.5            # over-confident on purpose
    frac_pos, mean_pred = calibration_curve(correct, p, n_bins=10, strategy="uniform")
    counts = np.bincount(np.minimum((p * 10).astype(int), 9), minlength=10)
    ref = np.sum(counts[counts > 0] * np.abs(frac_pos - mean_pred)) / len(p)
    assert ece(p, correct) == pytest.approx(ref, abs=1e-12)
    assert brier(p, correct) == pytest.approx(brier_score_loss(correct, p), abs=1e-12)
    r = reliability(p, correct)
    np.testing.assert_array_equal(r["count"], counts)
    assert ece(np.full(10, 0.7), np.arange(10) < 7) == pytest.approx(0.0)
    assert ece(np.full(10, 0.9), np.arange(10) < 5) == pytest.approx(0.4)


def test_least_confident_share_by_hand():
    p = np.array([0.1, 0.2, 0.9, 0.95, 0.3, 0.8, 0.99, 0.97, 0.6, 0.85])
    ok = np.array([0, 1, 0, 1, 1, 1, 1, 1, 1, 0], bool)
    # 20 % of 10 stacks: the two least confident (0.1 wrong, 0.2 right) hold 1 of the 3 wrong
    assert least_confident_share(p, ok) == pytest.approx(1 / 3)
    assert least_confident_share(p, np.ones(10, bool)) is None
    m = range_measures(p, ok)
    assert m["stacks"] == 10 and m["exact"] == pytest.approx(0.7)


def _sample_truths(rng, tables):
    """IN ranges drawn from each table's exact distribution at T = 1 (brute-force enumeration)."""
    truths = []
    for t in tables:
        ref = brute_force_ranges(t)
        keys = list(ref)
        a, b = keys[rng.choice(len(keys), p=np.array([ref[k] for k in keys]) / sum(ref.values()))]
        truths.append(None if a == b else (a, b - 1))
    return truths


def test_fit_temperature_recovers_a_known_overconfidence():
    rng = np.random.default_rng(1)
    tables = [rng.normal(size=(int(rng.integers(6, 12)), 3)) * 1.5 for _ in range(300)]
    truths = _sample_truths(rng, tables)
    # the model reports its evidence 2.5x too strongly: the fitted T must undo it
    t, info = fit_temperature([2.5 * x for x in tables], truths)
    assert t == pytest.approx(2.5, rel=0.15)
    assert info["nll_after"] < info["nll_before"]
    t1, _ = fit_temperature(tables, truths)
    assert t1 == pytest.approx(1.0, rel=0.15)
    # calibrated, P(returned range) matches how often it is right
    p, ok = range_outcomes([2.5 * x for x in tables], truths, t)
    p_raw, _ = range_outcomes([2.5 * x for x in tables], truths, 1.0)
    assert ece(p, ok) < ece(p_raw, ok)
    assert ece(p, ok) < 0.08


def test_range_outcomes_use_the_decoders_answer():
    rng = np.random.default_rng(2)
    tables = [rng.normal(size=(8, 3)) * 2 for _ in range(20)]
    decoded = []
    for t in tables:
        o = ordered_decode(t)
        a, b = int(o["first"]), int(o["stop"])
        decoded.append(None if a == b else (a, b - 1))
    p, ok = range_outcomes(tables, decoded, 1.3)
    assert ok.all()
    for t, r, q in zip(tables, decoded, p):
        assert q == pytest.approx(distribution(t, 1.3).probability(r), abs=1e-6)


def test_calibration_file_round_trip_and_errors(tmp_path):
    c = Calibration(dict(stack=1.7, slice_ordered=0.8), dict(note="x"))
    c.save(tmp_path)
    back = Calibration.load(tmp_path)
    assert back.temperature("stack") == 1.7
    assert back.temperature("slice") == back.temperature("slice_ordered") == 0.8
    assert Calibration({}).temperature("stack") == 1.0
    (tmp_path / "calibration.json").write_text(json.dumps(dict(temperatures=dict(stack=-1))))
    with pytest.raises(ValueError, match="calibration.json.*> 0"):
        Calibration.load(tmp_path)
    (tmp_path / "calibration.json").write_text("{")
    with pytest.raises(ValueError, match="calibration.json: not a readable"):
        Calibration.load(tmp_path)


def _confident_features(y, p_right=0.9):
    """Features whose last 3 columns are log-probabilities putting p_right on the true class."""
    lp = np.full((len(y), 3), np.log((1 - p_right) / 2))
    lp[np.arange(len(y)), y] = np.log(p_right)
    return np.concatenate([np.zeros((len(y), 2)), lp], axis=1).astype(np.float32)


def test_truncation_test_flags_cut_ends_only():
    stacks = [np.array([0, 0, 1, 1, 1, 1, 2]), np.array([0, 1, 1, 1, 1, 2, 2]),
              np.array([1, 1, 1, 1, 2]), np.array([0, 0, 1, 1, 1, 1])]
    feats = [_confident_features(y) for y in stacks]
    out = truncation_test(feats, stacks, classifier_tables)
    assert out["cut_apex"] == dict(stacks=3, flagged=1.0)
    assert out["cut_base"] == dict(stacks=3, flagged=1.0)
    assert out["complete"] == dict(stacks=2, flagged=0.0)
    # a scorer that cannot see IN at the ends never flags them
    blind = lambda fs: [np.where(np.arange(len(f))[:, None] % (len(f) - 1) == 0,
                                 np.log([[.45, .1, .45]]), f[:, -3:]) for f in fs]
    out = truncation_test(feats, stacks, blind)
    assert out["cut_apex"]["flagged"] == 0.0 and out["cut_base"]["flagged"] == 0.0


def test_oof_stack_tables_hold_out_each_stack():
    from types import SimpleNamespace

    rng = np.random.default_rng(3)
    labels = [np.array([0] * a + [1] * 5 + [2] * b) for a, b in rng.integers(1, 3, size=(8, 2))]
    feats = [_confident_features(y, 0.7) + rng.normal(size=(len(y), 5)).astype(np.float32) * 0.1
             for y in labels]
    subjects = [f"s{i // 2}" for i in range(8)]
    # what train_stack_model records after a 2-fold CV (training one here would only cost time)
    info = dict(protocol=dict(hidden=4, epochs=50, learning_rates=[1e-2, 1e-3], folds=2),
                cv=dict(folds=2), selected=dict(learning_rate=1e-2, epochs=3))
    tables = oof_stack_tables(feats, labels, subjects, SimpleNamespace(info=info))
    assert [t.shape for t in tables] == [(len(y), 3) for y in labels]
    assert all(np.allclose(np.exp(t).sum(1), 1.0, atol=1e-5) for t in tables)
    no_cv = SimpleNamespace(info=dict(info, cv=None))
    assert oof_stack_tables(feats, labels, subjects, no_cv) is None

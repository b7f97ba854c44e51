"""The exact distribution over IN ranges against enumeration of every ordered labelling."""

import numpy as np
import pytest

from stackcls.decode.boundaries import (brute_force_ranges, distribution, distribution_batch,
                                 distributions, levels)
from stackcls.decode.ordered import decode_many, ordered_decode


def _tables(rng, n, lo=1, hi=12, scale=3.0):
    return [rng.normal(size=(int(rng.integers(lo, hi + 1)), 3)) * scale for _ in range(n)]


def _brute_marginals(ref, L):
    """Per-slice class marginals, first/last IN marginals and P(no IN) from the enumeration."""
    m = np.zeros((L, 3))
    first, last, none = np.zeros(L), np.zeros(L), 0.0
    for (a, b), p in ref.items():
        lab = [0] * a + [1] * (b - a) + [2] * (L - b)
        m[np.arange(L), lab] += p
        if a == b:
            none += p
        else:
            first[a] += p
            last[b - 1] += p
    return m, first, last, none


@pytest.mark.parametrize("temperature", [1.0, 0.4, 2.5])
def test_matches_brute_force(temperature):
    rng = np.random.default_rng(0)
    tables = _tables(rng, 30)
    for t, d in zip(tables, distributions(tables, temperature)):
        L = len(t)
        ref = brute_force_ranges(t, temperature)
        for (a, b), p in ref.items():
            assert d.joint[a, b] == pytest.approx(p, abs=2e-5)
        assert np.tril(d.joint, -1).max() == 0.0               # a > b is no labelling
        m, first, last, none = _brute_marginals(ref, L)
        np.testing.assert_allclose(d.marginals, m, atol=2e-5)
        np.testing.assert_allclose(d.first, first, atol=2e-5)
        np.testing.assert_allclose(d.last, last, atol=2e-5)
        assert d.none == pytest.approx(none, abs=2e-5)


def test_sums_to_one_and_mode_is_the_ordered_decoder():
    rng = np.random.default_rng(1)
    tables = _tables(rng, 80, hi=20, scale=5.0)
    for t, d in zip(tables, distributions(tables, 1.3)):
        assert d.joint.sum() == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_allclose(d.marginals.sum(1), 1.0, atol=1e-5)
        assert d.first.sum() + d.none == pytest.approx(1.0, abs=1e-5)
        assert d.last.sum() + d.none == pytest.approx(1.0, abs=1e-5)
        assert sum(p for _, p in d.ranges()) == pytest.approx(1.0, abs=1e-5)
    for t, d, lab in zip(tables, distributions(tables, 1.3), decode_many(tables)):   # one compile
        assert d.mode() == (int(np.sum(lab == 0)), int(np.sum(lab <= 1)))


def test_extreme_scores_stay_finite():
    # log-probabilities of a confident model reach -1e2 and beyond; nothing may overflow or NaN
    rng = np.random.default_rng(2)
    t = rng.normal(size=(16, 3)) * 200.0
    d = distribution(t, 0.05)
    assert np.isfinite(d.joint).all() and np.isfinite(d.marginals).all()
    assert d.joint.sum() == pytest.approx(1.0, abs=1e-5)
    assert d.mode() == (int(ordered_decode(t)["first"]), int(ordered_decode(t)["stop"]))


def test_padding_changes_nothing():
    rng = np.random.default_rng(3)
    tables = _tables(rng, 12, lo=1, hi=9)
    S = 16
    batch = np.zeros((len(tables), S, 3), np.float32)
    for i, t in enumerate(tables):
        batch[i, :len(t)] = t
        batch[i, len(t):] = np.nan if i % 2 else rng.normal(size=(S - len(t), 3)) * 1e6
    lengths = np.array([len(t) for t in tables], np.int32)
    out = {k: np.asarray(v) for k, v in distribution_batch(batch, lengths, 1.0).items()}
    for i, t in enumerate(tables):
        L = len(t)
        alone = distribution(t)
        np.testing.assert_allclose(np.exp(out["log_joint"][i, :L + 1, :L + 1]), alone.joint, atol=1e-6)
        assert np.all(np.exp(out["log_joint"][i, L + 1:, :]) == 0)
        assert np.all(np.exp(out["log_joint"][i, :, L + 1:]) == 0)
        np.testing.assert_allclose(out["marginals"][i, :L], alone.marginals, atol=1e-6)
        assert np.all(out["marginals"][i, L:] == 0) and np.all(out["first"][i, L:] == 0)
        assert np.isfinite(out["log_joint"][i]).sum() == (L + 1) * (L + 2) // 2


def test_hand_computed_two_slices():
    # two slices, six labellings: OO OI OB II IB BB (a, b) = (2,2) (1,2) (1,1) (0,2) (0,1) (0,0)
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    lp = np.log(p)
    w = {(2, 2): .7 * .1, (1, 2): .7 * .6, (1, 1): .7 * .3, (0, 2): .2 * .6, (0, 1): .2 * .3,
         (0, 0): .1 * .3}
    z = sum(w.values())
    d = distribution(lp)
    for k, v in w.items():
        assert d.joint[k] == pytest.approx(v / z, abs=1e-6)
    assert d.probability((1, 1)) == pytest.approx(w[(1, 2)] / z, abs=1e-6)
    assert d.probability(None) == pytest.approx((w[(2, 2)] + w[(1, 1)] + w[(0, 0)]) / z, abs=1e-6)
    assert d.ranges()[0] == ((1, 1), pytest.approx(w[(1, 2)] / z, abs=1e-6))
    cov = d.coverage()
    # z = 0.91; P(slice 0 IN) = (w02 + w01) / z = 0.18 / z; P(slice 1 IN) = (w12 + w02) / z = 0.54 / z
    assert cov["apex_end_in"] == pytest.approx(0.18 / 0.91, abs=1e-6)
    assert cov["base_end_in"] == pytest.approx(0.54 / 0.91, abs=1e-6)
    assert cov["status"] == "base may be missing"
    with pytest.raises(ValueError, match="not a range"):
        d.probability((1, 2))


def test_temperature_flattens_and_sharpens():
    t = np.log(np.array([[.8, .1, .1], [.2, .7, .1], [.1, .7, .2], [.1, .2, .7]]))
    p = [distribution(t, T).probability((1, 2)) for T in (0.5, 1.0, 2.0)]
    assert p[0] > p[1] > p[2]
    assert distribution(t, 1e3).joint[np.triu_indices(5)].std() < 1e-3   # ~uniform over the pairs


def test_levels_in_thirds():
    assert levels(None, 3) == [None] * 3
    assert levels((1, 1), 3) == [None, "mid", None]
    assert levels((0, 1), 2) == ["apical", "basal"]
    assert levels((2, 7), 10) == [None, None, "apical", "apical", "mid", "mid", "basal", "basal",
                                  None, None]
    assert levels((0, 3), 4) == ["apical", "mid", "mid", "basal"]

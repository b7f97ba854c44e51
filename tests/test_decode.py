"""Ordered decoding against brute force over every boundary pair, with padding masked."""

import jax
import numpy as np
import pytest

from stackcls.decode.ordered import (brute_force_decode, bucket, decode_batch, decode_many, in_range,
                             ordered_decode)
from stackcls.stack import CLASSES, is_ordered


def _random_tables(rng, n, lo=1, hi=12):
    return [rng.normal(size=(int(rng.integers(lo, hi + 1)), 3)) * 3 for _ in range(n)]


def test_single_stack_matches_brute_force():
    rng = np.random.default_rng(0)
    for s in _random_tables(rng, 60):
        out = ordered_decode(s)
        ref_lab, ref_score = brute_force_decode(s)
        np.testing.assert_array_equal(np.asarray(out["labels"]), ref_lab)
        assert float(out["score"]) == pytest.approx(ref_score, rel=1e-5, abs=1e-4)
        lab = np.asarray(out["labels"])
        assert is_ordered([CLASSES[i] for i in lab])
        assert int(out["first"]) == int(np.sum(lab == 0))
        assert int(out["stop"]) == int(np.sum(lab <= 1))


def test_batched_padded_matches_brute_force_and_padding_is_ignored():
    rng = np.random.default_rng(1)
    tables = _random_tables(rng, 40, lo=1, hi=10)
    S = 10
    batch = np.full((len(tables), S, 3), np.nan, np.float32)   # NaN padding must never leak
    for i, t in enumerate(tables):
        batch[i, :len(t)] = t
        batch[i, len(t):] = rng.normal(size=(S - len(t), 3)) * 1e6 if i % 2 else np.nan
    lengths = np.array([len(t) for t in tables])
    out = ordered_decode(batch, lengths)
    for i, t in enumerate(tables):
        ref_lab, ref_score = brute_force_decode(t.astype(np.float32))
        lab = np.asarray(out["labels"][i])
        np.testing.assert_array_equal(lab[:len(t)], ref_lab)
        assert np.all(lab[len(t):] == -1)
        assert float(out["score"][i]) == pytest.approx(ref_score, rel=1e-4, abs=1e-3)


def test_hand_computed_case_and_empty_runs():
    lp = np.log(np.array([[.8, .1, .1], [.1, .8, .1], [.7, .2, .1], [.1, .8, .1], [.1, .1, .8]]))
    out = ordered_decode(lp)
    # slice 2 looks OAP but sits between IN slices: the order forces it to IN
    assert np.asarray(out["labels"]).tolist() == [0, 1, 1, 1, 2]
    assert in_range(np.asarray(out["labels"])) == (1, 3)
    all_in = np.log(np.array([[.1, .8, .1]] * 4))
    out = ordered_decode(all_in)
    assert (int(out["first"]), int(out["stop"])) == (0, 4)
    no_in = np.log(np.array([[.8, .1, .1], [.1, .1, .8]]))
    out = ordered_decode(no_in)
    assert np.asarray(out["labels"]).tolist() == [0, 2]
    assert in_range(np.asarray(out["labels"])) is None


def test_jittable_inside_user_code():
    f = jax.jit(lambda x, n: ordered_decode(x, n)["labels"])
    x = np.log(np.full((2, 4, 3), 1 / 3, np.float32)) + np.eye(3, dtype=np.float32)[[0, 1, 1, 2]]
    assert np.asarray(f(x, np.array([4, 3]))).tolist() == [[0, 1, 1, 2], [0, 1, 1, -1]]


def test_bad_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\(S, 3\)"):
        ordered_decode(np.zeros((4, 2)))


def test_in_range_of_indices_and_names():
    assert in_range([0, 1, 1, 2]) == (1, 2) and in_range(np.array([0, 2, 1, 0, 1])) == (2, 4)
    assert in_range(["OAP", "IN", "IN", "OBS"]) == (1, 2) and in_range(["IN"]) == (0, 0)
    assert in_range(["OAP", "OBS"]) is None and in_range([]) is None
    assert all(type(v) is int for v in in_range(np.array([0, 1, 1], np.int32)))


def test_bucket_and_decode_many_match_single_decodes():
    assert [bucket(s) for s in (1, 15, 16, 17, 32, 33)] == [16, 16, 16, 32, 32, 48]
    tables = _random_tables(np.random.default_rng(2), 12, lo=1, hi=20)
    for t, lab in zip(tables, decode_many(tables)):
        assert lab.shape == (len(t),)
        np.testing.assert_array_equal(lab, brute_force_decode(t.astype(np.float32))[0])
    assert decode_many([]) == []
    # the public batch decoder is the one ordered_decode runs
    x = np.stack([np.pad(t.astype(np.float32), ((0, 20 - len(t)), (0, 0))) for t in tables[:3]])
    n = np.array([len(t) for t in tables[:3]], np.int32)
    np.testing.assert_array_equal(np.asarray(decode_batch(x, n)[0]),
                                  np.asarray(ordered_decode(x, n)["labels"]))
